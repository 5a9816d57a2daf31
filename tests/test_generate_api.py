"""Generate and GenerateStream over gRPC, through the real LiteLLM HTTP path to a fake
OpenAI-compatible server on 127.0.0.1, and rewards bucketed per prompt version in Stats."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
import pytest

from oo.scoring.v1 import scoring_pb2 as pb
from oo_ml.generate.gateway import load_litellm
from tests.conftest import Running, ServerFactory
from tests.fake_llm import FakeLLM
from tests.helpers import assert_eventually, field_violations

pytestmark = pytest.mark.filterwarnings(
    "ignore:Item 'summary' on TypedDict class 'ChatCompletionReasoningItem':UserWarning"
)


@pytest.fixture(scope="module", autouse=True)
def litellm_loaded() -> None:
    # Import once, outside every test's deadline (the server warms it on a thread too).
    load_litellm()


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeLLM]:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    server = await FakeLLM().start()
    yield server
    await server.close()


async def llm_server(server_factory: ServerFactory, fake: FakeLLM, **env: str) -> Running:
    settings = {"OO_LLM_MODEL": "openai/fake-model", "OO_LLM_API_BASE": fake.api_base}
    settings.update(env)
    return await server_factory(settings)


async def test_generate_returns_the_models_text_with_its_provenance(
    server_factory: ServerFactory, fake: FakeLLM
) -> None:
    srv = await llm_server(server_factory, fake)
    fake.text = "Close one small overdue task before your 3 pm slump."
    resp = await srv.stub.Generate(
        pb.GenerateRequest(user_id="ann", context=pb.Context(hour_of_day=14, overdue_tasks=3))
    )
    assert resp.text == fake.text and not resp.fallback and resp.fallback_reason == ""
    assert resp.prompt_version == "v1" and resp.model == "openai/fake-model"
    assert resp.generation_id and resp.latency_ms > 0
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        42,
        7,
        49,
    )
    assert len(fake.requests) == 1
    prompt = fake.requests[0]["messages"][-1]["content"]
    assert "3" in prompt and ("14" in prompt or "2 pm" in prompt or "afternoon" in prompt)


async def test_http_500_gives_a_fallback(server_factory: ServerFactory, fake: FakeLLM) -> None:
    srv = await llm_server(server_factory, fake)
    fake.status = 500
    resp = await srv.stub.Generate(pb.GenerateRequest(user_id="ann"))
    assert resp.fallback and resp.fallback_reason.startswith("provider error")
    assert resp.text


async def test_no_model_configured_gives_the_fallback_and_says_why(server: Running) -> None:
    resp = await server.stub.Generate(pb.GenerateRequest(user_id="ann"))
    assert resp.fallback and resp.fallback_reason == "no model configured" and resp.text


async def test_unknown_prompt_version_is_invalid_argument(server: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.Generate(pb.GenerateRequest(user_id="ann", prompt_version="v99"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_version" in field_violations(info.value)
    assert "v1" in (info.value.details() or "") and "v2" in (info.value.details() or "")


async def test_generate_stream_delivers_deltas_then_the_result(
    server_factory: ServerFactory, fake: FakeLLM
) -> None:
    srv = await llm_server(server_factory, fake)
    fake.chunks = ["Take ", "a five-minute ", "walk, then ", "start the budget."]
    deltas, results = [], []
    async for msg in srv.stub.GenerateStream(
        pb.GenerateStreamRequest(user_id="ann", prompt_version="v2")
    ):
        if msg.HasField("result"):
            results.append(msg.result)
        else:
            deltas.append(msg.delta)
    assert len(deltas) >= 2 and len(results) == 1
    assert results[0].text == "".join(deltas).strip()
    assert results[0].prompt_version == "v2" and not results[0].fallback


async def test_rewards_are_reported_per_prompt_version(
    server_factory: ServerFactory, fake: FakeLLM
) -> None:
    srv = await llm_server(server_factory, fake)
    gens = {}
    for version in ("v1", "v2"):
        gens[version] = await srv.stub.Generate(
            pb.GenerateRequest(user_id="ann", prompt_version=version)
        )
    fake.status = 500
    gens["fallback"] = await srv.stub.Generate(
        pb.GenerateRequest(user_id="ann", prompt_version="v1")
    )
    assert gens["fallback"].fallback
    rewards = {"v1": 1.0, "v2": 0.0, "fallback": 0.5}
    for rounds in range(2):
        for version, gen in gens.items():
            resp = await srv.stub.Score(
                pb.ScoreRequest(
                    user_id=f"u{rounds}",
                    # Only the generation id: the server knows which prompt wrote it.
                    candidates=[
                        pb.Candidate(
                            tip_id=f"gen-{version}",
                            arm="generated",
                            generation_id=gen.generation_id,
                        )
                    ],
                )
            )
            await srv.stub.Reward(
                pb.RewardRequest(decision_id=resp.decision_id, reward=rewards[version])
            )
    stats = await srv.stub.Stats(pb.StatsRequest())
    buckets = {p.prompt_version: p for p in stats.prompt_versions}
    assert set(buckets) == {"v1", "v2", "fallback"}
    for version, reward in rewards.items():
        b = buckets[version]
        assert (b.served, b.rewarded) == (2, 2)
        assert math.isclose(b.mean_reward, reward) and math.isclose(b.reward_sum, 2 * reward)
    per_user = await srv.stub.Stats(pb.StatsRequest(user_id="u0"))
    assert {p.prompt_version for p in per_user.prompt_versions} == {"v1", "v2", "fallback"}


async def test_a_call_the_client_cancels_is_counted_as_cancelled(
    server_factory: ServerFactory, fake: FakeLLM
) -> None:
    srv = await llm_server(server_factory, fake, OO_LLM_TIMEOUT_S="30")
    fake.hold = asyncio.Event()  # the model does not answer until released
    call = srv.stub.Generate(pb.GenerateRequest(user_id="ann"))

    async def asked() -> None:
        assert len(fake.requests) == 1

    await assert_eventually(asked, 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    labels = (("method", "Generate"), ("code", "CANCELLED"))

    async def counted() -> None:
        assert srv.app.metrics.value("oo_rpc_total", labels) == 1

    await assert_eventually(counted, 5)
    assert srv.app.metrics.value("oo_rpc_total", (("method", "Generate"), ("code", "OK"))) == 0
    fake.hold.set()

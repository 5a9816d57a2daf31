"""Hostile input, fuzzed (issue 13, item 4): well-typed messages and random bytes against
every RPC, and random, truncated, mistyped and oversized messages on the ingest subjects.

Properties, checked after every example:
- every call ends in a documented status (DOCUMENTED) within its deadline;
- the server stays SERVING (health check);
- data written before the fuzzing is unchanged: a keeper user's Stats, and a rewarded
  decision stays rewarded (a second Reward is not applied).

Bounded for `make test` (a few dozen examples per test, the file in well under 40 s);
`make fuzz` raises the examples through OO_FUZZ_EXAMPLES (docs/fuzz.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oo.events.v1 import envelope_pb2
from oo.scoring.v1 import scoring_pb2 as pb
from tests.conftest import Running, ServerFactory
from tests.helpers import assert_eventually, assert_same_learning
from tests.natsfix import feedback
from tests.test_ingest import Harness, harness, harness_factory, nats_server  # noqa: F401
from tests.test_validation_fast_path import FLOATS, TEXT_LENGTHS, contexts, envelopes, profiles
from tests.test_validation_fast_path import score_requests as typed_score_requests

EXAMPLES = int(os.environ.get("OO_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)
DEADLINE_S = 5.0
MAX_MESSAGE = 64 * 1024

C = grpc.StatusCode
DOCUMENTED = frozenset(
    {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.FAILED_PRECONDITION,
        C.UNAUTHENTICATED,
        C.PERMISSION_DENIED,
        C.RESOURCE_EXHAUSTED,
    }
)
USER, ADMIN = "fuzz-user-token", "fuzz-admin-token"
# Mostly valid tokens, so that most calls get past auth to the handlers (Reset: the admin's).
TOKENS = st.sampled_from([USER, USER, ADMIN, ADMIN, ADMIN, None, "wrong", "", "x" * 300])
SERVICE = "/oo.scoring.v1.ScoringService/"
UNARY = ("Score", "Reward", "Stats", "Generate", "Reset")
KEEPER = "keeper-user"


@dataclass
class Fuzzed:
    srv: Running
    keeper_stats: pb.StatsResponse
    rewarded_decision: str

    def metadata(self, token: str | None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),) if token is not None else ()

    async def call(self, method: str, body: bytes, token: str | None) -> grpc.StatusCode:
        """One raw call; its final status (a call may not outlive its deadline)."""
        md = self.metadata(token)
        ch = self.srv.channel
        try:
            if method == "GenerateStream":
                stream = ch.unary_stream(SERVICE + method)
                async for _ in stream(body, timeout=DEADLINE_S, metadata=md):
                    pass
            else:
                await ch.unary_unary(SERVICE + method)(body, timeout=DEADLINE_S, metadata=md)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return C.OK

    async def check_invariants(self) -> None:
        health = health_pb2_grpc.HealthStub(self.srv.channel)
        for service in ("", "oo.scoring.v1.ScoringService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        md = self.metadata(USER)
        now = await self.srv.stub.Stats(pb.StatsRequest(user_id=KEEPER), metadata=md, timeout=5)
        assert_same_learning(self.keeper_stats, now)
        again = await self.srv.stub.Reward(
            pb.RewardRequest(decision_id=self.rewarded_decision, reward=0), metadata=md, timeout=5
        )
        assert not again.applied  # still rewarded: the second reward changes nothing


@pytest.fixture
async def fuzzed(server_factory: ServerFactory) -> Fuzzed:
    srv = await server_factory(
        {
            "OO_AUTH_TOKEN": USER,
            "OO_ADMIN_TOKEN": ADMIN,
            "OO_MAX_MESSAGE_BYTES": str(MAX_MESSAGE),
        }
    )
    md = (("authorization", f"Bearer {USER}"),)
    candidates = [pb.Candidate(tip_id=f"k{i}", arm=f"arm{i}") for i in range(3)]
    scored = await srv.stub.Score(
        pb.ScoreRequest(user_id=KEEPER, candidates=candidates), metadata=md
    )
    rewarded = await srv.stub.Reward(
        pb.RewardRequest(decision_id=scored.decision_id, reward=1), metadata=md
    )
    assert rewarded.applied
    stats = await srv.stub.Stats(pb.StatsRequest(user_id=KEEPER), metadata=md)
    return Fuzzed(srv, stats, scored.decision_id)


# -- well-typed messages -----------------------------------------------------------------------

USER_IDS = st.one_of(
    TEXT_LENGTHS.map(lambda n: "u" * n), st.text(max_size=40).filter(lambda s: s != KEEPER)
)


@st.composite
def generate_requests(draw: st.DrawFn, cls: Any) -> Any:
    req = cls(
        user_id=draw(USER_IDS), prompt_version=draw(st.sampled_from(["", "v1", "nope", "p" * 65]))
    )
    if draw(st.booleans()):
        req.context.CopyFrom(draw(contexts()))
    if draw(st.booleans()):
        req.profile_features.CopyFrom(draw(profiles()))
    return req


def _decision_ids() -> st.SearchStrategy[str]:
    return st.one_of(TEXT_LENGTHS.map(lambda n: "d" * n), st.text(max_size=40))


TYPED: st.SearchStrategy[tuple[str, Any]] = st.one_of(
    typed_score_requests().map(lambda r: ("Score", r)),
    st.builds(pb.RewardRequest, decision_id=_decision_ids(), reward=FLOATS).map(
        lambda r: ("Reward", r)
    ),
    st.builds(
        pb.StatsRequest,
        user_id=USER_IDS,
        policy=st.sampled_from(["", "egreedy", "linucb", "nope", "p" * 65]),
    ).map(lambda r: ("Stats", r)),
    generate_requests(pb.GenerateRequest).map(lambda r: ("Generate", r)),
    generate_requests(pb.GenerateStreamRequest).map(lambda r: ("GenerateStream", r)),
    st.builds(pb.ResetRequest, user_id=USER_IDS).map(lambda r: ("Reset", r)),
)


@FUZZ
@given(call=TYPED, token=TOKENS)
async def test_well_typed_messages_end_in_a_documented_status(
    fuzzed: Fuzzed, call: tuple[str, Any], token: str | None
) -> None:
    method, message = call
    code = await fuzzed.call(method, message.SerializeToString(), token)
    assert code in DOCUMENTED, (method, code)
    await fuzzed.check_invariants()


# -- random bytes --------------------------------------------------------------------------------


def _truncated(messages: st.SearchStrategy[tuple[str, Any]]) -> st.SearchStrategy[bytes]:
    @st.composite
    def cut(draw: st.DrawFn) -> bytes:
        _, message = draw(messages)
        raw: bytes = message.SerializeToString()
        return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]

    return cut()


BODIES = st.one_of(
    st.binary(max_size=512),
    _truncated(TYPED),
    st.sampled_from([b"\x00" * 10, b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 3]),
    # Over OO_MAX_MESSAGE_BYTES: refused by grpc itself, RESOURCE_EXHAUSTED.
    st.sampled_from([MAX_MESSAGE + 1, 4 * MAX_MESSAGE]).map(lambda n: b"\x0a" + b"x" * n),
)


@FUZZ
@given(
    method=st.sampled_from((*UNARY, "GenerateStream")),
    body=BODIES,
    token=st.sampled_from([USER, ADMIN, ADMIN, None]),
)
async def test_random_bytes_end_in_a_documented_status(
    fuzzed: Fuzzed, method: str, body: bytes, token: str | None
) -> None:
    code = await fuzzed.call(method, body, token)
    assert code in DOCUMENTED, (method, code, body[:64])
    await fuzzed.check_invariants()


async def test_an_oversized_message_is_resource_exhausted(fuzzed: Fuzzed) -> None:
    code = await fuzzed.call("Score", b"\x0a" + b"x" * (2 * MAX_MESSAGE), USER)
    assert code == C.RESOURCE_EXHAUSTED
    await fuzzed.check_invariants()


# -- ingest ----------------------------------------------------------------------------------------

CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/protobuf",
        "application/x-protobuf",
        "text/plain",
        "application/json; charset=utf-8",
        "",
        "ä/ö",
        "x" * 5000,
    ]
)


@st.composite
def ingest_payloads(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    env: envelope_pb2.Envelope = draw(envelopes())
    kind = draw(st.sampled_from(["binary", "json", "truncated", "random"]))
    if kind == "binary":
        data = env.SerializeToString()
    elif kind == "json":
        from google.protobuf import json_format

        data = json_format.MessageToJson(env).encode()
    elif kind == "truncated":
        raw = env.SerializeToString()
        data = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    else:
        data = draw(st.binary(max_size=256))
    headers: dict[str, str] = {}
    ctype = draw(CONTENT_TYPES)
    if ctype is not None:
        headers["Content-Type"] = ctype
    if draw(st.booleans()):
        headers["X-Junk"] = "j" * draw(st.sampled_from([1, 1000, 16_000]))
    return data, headers


@settings(
    max_examples=max(EXAMPLES // 2, 10),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(ingest_payloads(), min_size=1, max_size=8), subjects=st.data())
async def test_hostile_ingest_messages_are_settled_and_harm_nothing(
    harness: Harness,  # noqa: F811
    batch: Sequence[tuple[bytes, dict[str, str]]],
    subjects: st.DataObject,
) -> None:
    if not harness.decisions:
        keeper = await harness.decide("keeper")
        await harness.publish("feedback.tip", feedback("keeper-fb", keeper))

        async def rewarded() -> None:
            assert await harness.rewarded() == 1

        await assert_eventually(rewarded, 10)
    for data, headers in batch:
        subject = subjects.draw(st.sampled_from(["feedback.tip", "signals.x", "signals.tasks"]))
        await harness.js.publish(subject, data, headers=headers or None)
    # A replayed feedback for the rewarded decision, under a new event id.
    replay = feedback(f"replay-{len(harness.decisions)}", harness.decisions[0])
    harness.decisions.append("replay")
    await harness.publish("feedback.tip", replay)

    async def settled() -> None:
        for durable in ("oo-ml-feedback", "oo-ml-signals"):
            info = await harness.consumer(durable)
            assert info.num_pending == 0 and info.num_ack_pending == 0, (durable, info)

    await assert_eventually(settled, 15)
    assert harness.ingest.counters.errors == 0
    assert await harness.rewarded() == 1  # the keeper decision, rewarded once
    assert await harness.health_status() == health_pb2.HealthCheckResponse.SERVING

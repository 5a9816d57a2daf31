"""Score, Reward, Stats and Reset over a real grpc.aio server on a loopback port 0,
backed by a real SQLite file."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from oo.scoring.v1 import scoring_pb2 as pb
from tests.conftest import Running, ServerFactory
from tests.helpers import assert_eventually, field_violations

ARMS = ["focus", "break", "plan", "review"]


def score_request(user: str = "u1", hour: int | None = 9, **kw: object) -> pb.ScoreRequest:
    if "context" not in kw:
        kw["context"] = pb.Context(hour_of_day=hour) if hour is not None else pb.Context()
    return pb.ScoreRequest(
        user_id=user,
        candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in ARMS],
        **kw,  # type: ignore[arg-type]
    )


async def test_health_and_reflection(server: Running) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "oo.scoring.v1.ScoringService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert "oo.scoring.v1.ScoringService" in names


async def test_score_answers_with_scores_propensities_and_features(server: Running) -> None:
    resp = await server.stub.Score(score_request())
    assert resp.decision_id and resp.policy == "egreedy" and resp.feature_version == "v1"
    assert {c.tip_id for c in resp.ranking} == {f"tip-{a}" for a in ARMS}
    assert resp.ranking[0].tip_id == resp.chosen_tip_id
    assert math.isclose(sum(c.propensity for c in resp.ranking), 1.0)
    assert all(c.propensity > 0 for c in resp.ranking)  # egreedy explores every arm
    origins = {f.name: f.origin for f in resp.features}
    assert origins["hour_of_day"] == pb.FEATURE_ORIGIN_REQUEST
    assert origins["day_of_week"] == pb.FEATURE_ORIGIN_SERVER_CLOCK
    assert origins["completion_rate_30d"] == pb.FEATURE_ORIGIN_FALLBACK


@pytest.mark.parametrize("policy", ["egreedy", "egreedy-v2", "linucb", "lints", "uniform"])
async def test_every_policy_gives_propensities_summing_to_one(server: Running, policy: str) -> None:
    for _ in range(3):
        resp = await server.stub.Score(score_request(policy=policy))
        assert resp.policy == policy
        assert math.isclose(sum(c.propensity for c in resp.ranking), 1.0)
        chosen = next(c for c in resp.ranking if c.tip_id == resp.chosen_tip_id)
        assert chosen.propensity > 0
        applied = await server.stub.Reward(pb.RewardRequest(decision_id=resp.decision_id, reward=1))
        assert applied.applied


async def test_empty_arm_defaults_to_tip_id(server: Running) -> None:
    req = pb.ScoreRequest(
        user_id="u", candidates=[pb.Candidate(tip_id="a"), pb.Candidate(tip_id="b")]
    )
    resp = await server.stub.Score(req)
    assert {c.arm for c in resp.ranking} == {"a", "b"}


def _bad_inputs() -> list[tuple[str, object, str]]:
    many = [pb.Candidate(tip_id=f"t{i}", arm="a") for i in range(5000)]
    return [
        ("empty user_id", score_request(user=""), "user_id"),
        ("no candidates", pb.ScoreRequest(user_id="u"), "candidates"),
        (
            "duplicate tip_id",
            pb.ScoreRequest(
                user_id="u",
                candidates=[pb.Candidate(tip_id="t", arm="a"), pb.Candidate(tip_id="t", arm="b")],
            ),
            "candidates[1].tip_id",
        ),
        ("hour 25", score_request(hour=25), "context.hour_of_day"),
        (
            "NaN profile feature",
            score_request(profile_features=pb.ProfileFeatures(completion_rate_30d=float("nan"))),
            "profile_features.completion_rate_30d",
        ),
        (
            "out-of-range profile feature",
            score_request(profile_features=pb.ProfileFeatures(dismiss_rate_30d=1.5)),
            "profile_features.dismiss_rate_30d",
        ),
        ("5,000 candidates", pb.ScoreRequest(user_id="u", candidates=many), "candidates"),
        ("10,000-char user_id", score_request(user="x" * 10_000), "user_id"),
        ("unknown policy", score_request(policy="nope"), "policy"),
        (
            "bad timezone",
            score_request(hour=None, context=pb.Context(timezone="Mars/Olympus")),
            "context.timezone",
        ),
        ("NaN reward", pb.RewardRequest(decision_id="d", reward=float("nan")), "reward"),
        ("reward out of range", pb.RewardRequest(decision_id="d", reward=7), "reward"),
        ("empty decision_id", pb.RewardRequest(reward=1), "decision_id"),
        ("long policy on Stats", pb.StatsRequest(policy="p" * 100), "policy"),
    ]


@pytest.mark.parametrize(
    ("case", "request_", "field"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()]
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    server: Running, case: str, request_: object, field: str
) -> None:
    call = {
        pb.ScoreRequest: server.stub.Score,
        pb.RewardRequest: server.stub.Reward,
        pb.StatsRequest: server.stub.Stats,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request_)  # type: ignore[operator]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    violations = field_violations(info.value)
    assert field in violations, (case, violations)
    # ...and the server keeps serving.
    assert (await server.stub.Score(score_request())).decision_id


async def test_unknown_policy_lists_known_policies(server: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.Score(score_request(policy="greedy-nonsense"))
    details = info.value.details() or ""
    for name in ("egreedy", "egreedy-v2", "linucb", "lints", "uniform"):
        assert name in details


async def test_reward_joins_the_decision_once(server: Running) -> None:
    resp = await server.stub.Score(score_request())
    first = await server.stub.Reward(pb.RewardRequest(decision_id=resp.decision_id, reward=1))
    assert first.applied and first.policy == "egreedy"
    chosen_arm = next(c.arm for c in resp.ranking if c.tip_id == resp.chosen_tip_id)
    assert first.arm == chosen_arm
    second = await server.stub.Reward(pb.RewardRequest(decision_id=resp.decision_id, reward=0))
    assert not second.applied
    stats = await server.stub.Stats(pb.StatsRequest(user_id="u1"))
    arm = next(a for a in stats.arms if a.arm == chosen_arm)
    assert (arm.pulls, arm.rewarded, arm.reward_sum) == (1, 1, 1.0)
    assert stats.decisions == 1 and stats.rewarded == 1 and stats.pending == 0


async def test_concurrent_rewards_of_one_decision_apply_once(server: Running) -> None:
    """Twenty rewards of one decision at once: one applies, the model learns once. (The
    first to take the user's lock skips its second read; the others wait and re-read, or
    fail the commit's once-only condition and re-read.)"""
    for round_ in range(5):
        resp = await server.stub.Score(score_request(user=f"c{round_}"))
        answers = await asyncio.gather(
            *(
                server.stub.Reward(pb.RewardRequest(decision_id=resp.decision_id, reward=1))
                for _ in range(20)
            )
        )
        assert sum(a.applied for a in answers) == 1
        stats = await server.stub.Stats(pb.StatsRequest(user_id=f"c{round_}"))
        assert stats.rewarded == 1 and sum(a.rewarded for a in stats.arms) == 1


async def test_unknown_decision_is_not_found(server: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.Reward(pb.RewardRequest(decision_id="no-such-decision", reward=1))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reward_after_window_is_failed_precondition(server_factory: ServerFactory) -> None:
    srv = await server_factory({"OO_REWARD_WINDOW_S": "0.2", "OO_DEFAULT_REWARD": "off"})
    resp = await srv.stub.Score(score_request())
    await asyncio.sleep(0.3)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await srv.stub.Reward(pb.RewardRequest(decision_id=resp.decision_id, reward=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stats = await srv.stub.Stats(pb.StatsRequest(user_id="u1"))
    assert stats.rewarded == 0 and stats.pending == 1


async def test_sweeper_gives_the_default_reward(server_factory: ServerFactory) -> None:
    srv = await server_factory(
        {"OO_REWARD_WINDOW_S": "0.2", "OO_DEFAULT_REWARD": "0.25", "OO_SWEEP_INTERVAL_S": "0.05"}
    )
    ids = [(await srv.stub.Score(score_request())).decision_id for _ in range(3)]

    async def swept() -> None:
        stats = await srv.stub.Stats(pb.StatsRequest(user_id="u1"))
        assert stats.rewarded == 3 and stats.pending == 0
        assert math.isclose(stats.reward_sum, 0.75)

    await assert_eventually(swept)
    late = await srv.stub.Reward(pb.RewardRequest(decision_id=ids[0], reward=1))
    assert not late.applied  # already rewarded by default; nothing changes


async def test_default_reward_can_be_switched_off(server_factory: ServerFactory) -> None:
    srv = await server_factory(
        {"OO_REWARD_WINDOW_S": "0.1", "OO_DEFAULT_REWARD": "off", "OO_SWEEP_INTERVAL_S": "0.05"}
    )
    await srv.stub.Score(score_request())
    assert srv.app.engine is not None
    sweep = next(j for j in srv.app.engine.upkeep.status() if j.name == "sweep")
    runs_before = sweep.runs

    async def swept_past_the_window() -> None:
        # Runs that started after the decision's window closed: the sweeper did look.
        assert sweep.runs >= runs_before + 3 and sweep.failures_total == 0

    await asyncio.sleep(0.15)  # past the 0.1 s window
    runs_before = sweep.runs
    await assert_eventually(swept_past_the_window, 5)
    stats = await srv.stub.Stats(pb.StatsRequest(user_id="u1"))
    assert stats.rewarded == 0 and stats.pending == 1


async def test_stats_defaults_and_aggregates(server: Running) -> None:
    for user in ("a", "b", "c"):
        resp = await server.stub.Score(score_request(user=user))
        await server.stub.Reward(pb.RewardRequest(decision_id=resp.decision_id, reward=0.5))
    await server.stub.Score(score_request(user="a"))
    agg = await server.stub.Stats(pb.StatsRequest())
    assert agg.policy == "egreedy" and agg.user_id == ""
    assert agg.users == 3 and agg.decisions == 4 and agg.rewarded == 3 and agg.pending == 1
    assert sum(a.pulls for a in agg.arms) == 4
    assert math.isclose(agg.reward_sum, 1.5)
    per_user = await server.stub.Stats(pb.StatsRequest(user_id="a", policy="egreedy"))
    assert per_user.decisions == 2 and per_user.rewarded == 1 and per_user.pending == 1


async def test_reset_clears_every_policy_and_pending_decisions(
    server_factory: ServerFactory,
) -> None:
    srv = await server_factory({"OO_ADMIN_TOKEN": "root", "OO_AUTH_TOKEN": "user"})
    user_md = (("authorization", "Bearer user"),)
    admin_md = (("authorization", "Bearer root"),)
    v1 = await srv.stub.Score(score_request(policy="egreedy"), metadata=user_md)
    await srv.stub.Reward(pb.RewardRequest(decision_id=v1.decision_id, reward=1), metadata=user_md)
    pending = await srv.stub.Score(score_request(policy="egreedy-v2"), metadata=user_md)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await srv.stub.Reset(pb.ResetRequest(user_id="u1"), metadata=user_md)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reset = await srv.stub.Reset(pb.ResetRequest(user_id="u1"), metadata=admin_md)
    # One learned state (egreedy's, from the reward; a Score writes none) and the pending
    # egreedy-v2 decision.
    assert reset.states_cleared == 1 and reset.decisions_cleared == 1
    for policy in ("egreedy", "egreedy-v2"):
        stats = await srv.stub.Stats(pb.StatsRequest(user_id="u1", policy=policy), metadata=user_md)
        assert stats.decisions == 0 and not stats.arms and stats.pending == 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await srv.stub.Reward(
            pb.RewardRequest(decision_id=pending.decision_id, reward=1), metadata=user_md
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_auth_covers_every_rpc(server_factory: ServerFactory) -> None:
    srv = await server_factory({"OO_AUTH_TOKEN": "s3cret"})
    calls = [
        (srv.stub.Score, score_request()),
        (srv.stub.Reward, pb.RewardRequest(decision_id="d", reward=1)),
        (srv.stub.Stats, pb.StatsRequest()),
        (srv.stub.Reset, pb.ResetRequest(user_id="u")),
        (srv.stub.Generate, pb.GenerateRequest(user_id="u")),
    ]
    for call, req in calls:
        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(req, metadata=md)  # type: ignore[operator]
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = await srv.stub.Score(score_request(), metadata=(("authorization", "Bearer s3cret"),))
    assert ok.decision_id
    # Without an admin token configured, Reset is refused even to a valid user token.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await srv.stub.Reset(
            pb.ResetRequest(user_id="u"), metadata=(("authorization", "Bearer s3cret"),)
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Health stays open for probes.
    health = health_pb2_grpc.HealthStub(srv.channel)
    assert (
        await health.Check(health_pb2.HealthCheckRequest())
    ).status == health_pb2.HealthCheckResponse.SERVING


async def test_message_size_is_bounded(server_factory: ServerFactory) -> None:
    srv = await server_factory({"OO_MAX_MESSAGE_BYTES": "4096"})
    big = pb.ScoreRequest(
        user_id="u", candidates=[pb.Candidate(tip_id="t" * 200 + str(i)) for i in range(50)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await srv.stub.Score(big)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await srv.stub.Score(score_request())).decision_id


async def test_max_candidates_is_configurable(server_factory: ServerFactory) -> None:
    srv = await server_factory({"OO_MAX_CANDIDATES": "3"})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await srv.stub.Score(score_request())  # four candidates
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidates" in field_violations(info.value)


async def test_300_concurrent_rewards_on_one_user_are_all_counted(server: Running) -> None:
    ids = [(await server.stub.Score(score_request(hour=i % 24))).decision_id for i in range(300)]
    results = await asyncio.gather(
        *(server.stub.Reward(pb.RewardRequest(decision_id=d, reward=1)) for d in ids)
    )
    assert all(r.applied for r in results)
    stats = await server.stub.Stats(pb.StatsRequest(user_id="u1"))
    assert stats.decisions == 300 and stats.rewarded == 300 and stats.pending == 0
    assert sum(a.pulls for a in stats.arms) == 300 and sum(a.rewarded for a in stats.arms) == 300
    assert math.isclose(stats.reward_sum, 300.0)


async def test_expired_deadline_is_deadline_exceeded(server: Running) -> None:
    """A call whose deadline has passed when the server reaches it is refused with
    DEADLINE_EXCEEDED (counted by the server), and the server goes on serving.

    grpc-core keeps deadlines in whole milliseconds, so a 1 µs timeout is really up to
    1 ms, and a warm Score can answer inside it: the call is repeated until the server
    has refused one (measured: about a quarter of such calls reach it expired)."""
    labels = (("method", "Score"), ("code", "DEADLINE_EXCEEDED"))
    codes: set[grpc.StatusCode] = set()
    for _ in range(2000):
        try:
            await server.stub.Score(score_request(), timeout=0.000001)
            codes.add(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as e:
            codes.add(e.code())
        if server.app.metrics.value("oo_rpc_total", labels):
            break
    assert server.app.metrics.value("oo_rpc_total", labels) >= 1
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert (await server.stub.Score(score_request(), timeout=10)).decision_id


async def test_shadow_policies_learn_and_get_off_policy_estimates(
    server_factory: ServerFactory,
) -> None:
    srv = await server_factory({"OO_SHADOW_POLICIES": "egreedy-v2,linucb"})
    for i in range(40):
        resp = await srv.stub.Score(score_request(hour=i % 24))
        await srv.app.engine.drain()  # type: ignore[union-attr]
        chosen_arm = next(c.arm for c in resp.ranking if c.tip_id == resp.chosen_tip_id)
        # Every fourth reward is 1 whatever the choice, so the shadows always have a
        # nonzero reward to learn from (all 40 choices could miss: (3/4)^40).
        reward = 1.0 if chosen_arm == ARMS[(i % 24) // 6] or i % 4 == 0 else 0.0
        await srv.stub.Reward(pb.RewardRequest(decision_id=resp.decision_id, reward=reward))
    per_user = await srv.stub.Stats(pb.StatsRequest(user_id="u1"))
    assert not per_user.shadows and per_user.users == 0  # server-wide: the policy's answer
    stats = await srv.stub.Stats(pb.StatsRequest())
    shadows = {s.policy: s for s in stats.shadows}
    assert set(shadows) == {"egreedy-v2", "linucb"}
    for s in shadows.values():
        assert s.samples == 40
        assert s.dr_ci_low <= s.dr <= s.dr_ci_high
        assert 0.0 <= s.served_mean <= 1.0
    # The shadows learned from the served policy's rewards without being served.
    shadow_stats = await srv.stub.Stats(pb.StatsRequest(user_id="u1", policy="egreedy-v2"))
    assert shadow_stats.decisions == 0
    assert any(abs(a.estimate) > 1e-6 for a in shadow_stats.arms)


async def test_shutdown_turns_health_not_serving_before_the_server_goes(
    server_factory: ServerFactory,
) -> None:
    srv = await server_factory({"OO_SHUTDOWN_GRACE_S": "1"})
    health = health_pb2_grpc.HealthStub(srv.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="oo.scoring.v1.ScoringService"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(srv.app.stop())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    await stopping


async def test_metrics_count_calls_by_method_and_status(server_factory: ServerFactory) -> None:
    srv = await server_factory({"OO_METRICS_PORT": "0"})
    await srv.stub.Score(score_request())
    with pytest.raises(grpc.aio.AioRpcError):
        await srv.stub.Score(score_request(user=""))
    with pytest.raises(grpc.aio.AioRpcError):
        await srv.stub.Reward(pb.RewardRequest(decision_id="missing", reward=1))
    endpoint = srv.app._metrics_endpoint
    assert endpoint is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    assert body.startswith("HTTP/1.1 200 OK")
    assert 'oo_rpc_total{code="OK",method="Score"} 1.0' in body
    assert 'oo_rpc_total{code="INVALID_ARGUMENT",method="Score"} 1.0' in body
    assert 'oo_rpc_total{code="NOT_FOUND",method="Reward"} 1.0' in body
    assert 'oo_rpc_seconds_count{method="Score"} 2.0' in body
    assert 'oo_rpc_seconds_bucket{le="+Inf",method="Score"} 2.0' in body
    assert "oo_background_failures_total 0.0" in body
    assert "process_cpu_seconds_total" in body


async def test_calls_cut_by_their_deadline_leave_the_server_healthy(server: Running) -> None:
    codes = set()
    for i in range(300):
        try:
            await server.stub.Score(
                score_request(user=f"d{i % 7}"), timeout=0.002 + (i % 10) / 1000
            )
            codes.add("OK")
        except grpc.aio.AioRpcError as e:
            codes.add(e.code().name)
    assert codes <= {"OK", "DEADLINE_EXCEEDED"}
    resp = await server.stub.Score(score_request(), timeout=10)
    assert resp.decision_id
    assert (
        await server.stub.Reward(
            pb.RewardRequest(decision_id=resp.decision_id, reward=1), timeout=10
        )
    ).applied


async def test_an_admin_token_alone_guards_reset_only(server_factory: ServerFactory) -> None:
    srv = await server_factory({"OO_ADMIN_TOKEN": "root"})
    # Score, Reward, Stats stay open: OO_AUTH_TOKEN is not set.
    decision = await srv.stub.Score(score_request())
    await srv.stub.Reward(pb.RewardRequest(decision_id=decision.decision_id, reward=1))
    assert (await srv.stub.Stats(pb.StatsRequest(user_id="u1"))).rewarded == 1
    for md in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await srv.stub.Reset(pb.ResetRequest(user_id="u1"), metadata=md)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The scheme is case-insensitive (RFC 7235).
    reset = await srv.stub.Reset(
        pb.ResetRequest(user_id="u1"), metadata=(("authorization", "bearer root"),)
    )
    assert reset.states_cleared == 1


async def test_reflection_serves_the_error_detail_types(server: Running) -> None:
    # grpcurl resolves google.rpc.BadRequest through reflection to print field violations.
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol="google.rpc.BadRequest")
    async for answer in stub.ServerReflectionInfo(iter([ask])):
        protos = answer.file_descriptor_response.file_descriptor_proto
        names = {descriptor_pb2.FileDescriptorProto.FromString(p).name for p in protos}
        assert "google/rpc/error_details.proto" in names
        break

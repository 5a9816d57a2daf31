"""Crash and shutdown behaviour of a real `oo-ml serve` process on a real SQLite file."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oo.scoring.v1 import scoring_pb2 as pb
from oo.scoring.v1 import scoring_pb2_grpc
from tests.conftest import oo_ml_bin
from tests.helpers import ServerProcess, assert_same_learning

ARMS = ["focus", "break", "plan", "review"]


def start(data_dir: Path, env: dict[str, str]) -> ServerProcess:
    return ServerProcess(
        [
            oo_ml_bin(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            "--no-ingest",
        ],
        env,
    )


def score(user: str, hour: int) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        user_id=user,
        candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in ARMS],
        context=pb.Context(hour_of_day=hour),
    )


async def snapshot(
    stub: scoring_pb2_grpc.ScoringServiceStub, users: list[str]
) -> list[pb.StatsResponse]:
    return [await stub.Stats(pb.StatsRequest(user_id=u)) for u in users]


async def test_kill_9_after_acknowledged_rewards_keeps_stats(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    users = ["ann", "bob"]
    proc = start(tmp_path, clean_env)
    try:
        async with grpc.aio.insecure_channel(proc.address) as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            for i in range(60):
                resp = await stub.Score(score(users[i % 2], i % 24))
                if i % 3:
                    ack = await stub.Reward(
                        pb.RewardRequest(decision_id=resp.decision_id, reward=i % 2)
                    )
                    assert ack.applied
            before = await snapshot(stub, users)
            decisions = (await stub.Stats(pb.StatsRequest())).decisions
    finally:
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(timeout=10)
        proc.kill()
    assert proc.proc.returncode == -signal.SIGKILL

    again = start(tmp_path, clean_env)
    try:
        async with grpc.aio.insecure_channel(again.address) as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            for was, now in zip(before, await snapshot(stub, users), strict=True):
                assert_same_learning(was, now)
            assert (await stub.Stats(pb.StatsRequest())).decisions == decisions == 60
    finally:
        again.kill()


async def test_sigterm_drains_in_flight_calls_and_loses_no_acknowledged_reward(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    proc = start(tmp_path, clean_env)
    acked = 0
    try:
        async with grpc.aio.insecure_channel(proc.address) as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            ids = [(await stub.Score(score("carol", i % 24))).decision_id for i in range(200)]

            async def reward(decision_id: str) -> bool:
                try:
                    return (
                        await stub.Reward(pb.RewardRequest(decision_id=decision_id, reward=1))
                    ).applied
                except grpc.aio.AioRpcError as e:
                    # Calls that arrive after shutdown began are refused.
                    assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e
                    return False

            tasks = [asyncio.create_task(reward(d)) for d in ids]
            await asyncio.sleep(0.05)
            proc.proc.send_signal(signal.SIGTERM)
            acked = sum(await asyncio.gather(*tasks))
        assert proc.proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert acked > 0

    again = start(tmp_path, clean_env)
    try:
        async with grpc.aio.insecure_channel(again.address) as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            stats = await stub.Stats(pb.StatsRequest(user_id="carol"))
            # Every acknowledged reward is there; a reward in flight at SIGTERM may have been
            # committed after its client gave up, so the count can only be higher.
            assert stats.rewarded >= acked
            assert stats.decisions == 200
            health = health_pb2_grpc.HealthStub(ch)
            status = (await health.Check(health_pb2.HealthCheckRequest())).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        again.kill()

"""The hot path's promises: the model cache equals the store, decisions written behind the
answer lose at most the last flush interval on a crash, and acknowledged rewards none."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from oo.scoring.v1 import scoring_pb2 as pb
from oo.scoring.v1 import scoring_pb2_grpc
from oo_ml import config as config_mod
from oo_ml.domain.engine import Candidate, ScoreCommand, ScoringEngine
from oo_ml.domain.features import Inputs, NoStoredFeatures
from oo_ml.domain.state import PolicyState
from oo_ml.errors import NotFound
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.sqlite.scoring import SqliteStore
from tests.helpers import ServerProcess

POLICIES = ("egreedy", "egreedy-v2", "linucb", "lints")
ARMS = ("focus", "break", "plan", "review")


def same(a: PolicyState, b: PolicyState) -> bool:
    if (a.policy, a.feature_version, a.dim, a.decisions, a.rewards) != (
        b.policy,
        b.feature_version,
        b.dim,
        b.decisions,
        b.rewards,
    ) or set(a.arms) != set(b.arms):
        return False
    return all(
        np.array_equal(m.a_inv, b.arms[k].a_inv)
        and np.array_equal(m.b, b.arms[k].b)
        and (m.pulls, m.rewarded, m.reward_sum)
        == (b.arms[k].pulls, b.arms[k].rewarded, b.arms[k].reward_sum)
        for k, m in a.arms.items()
    )


async def assert_cache_equals_store(engine: ScoringEngine, store: SqliteStore) -> int:
    checked = 0
    for user, policy in engine.models.cached_keys():
        cached = engine.models.cached(user, policy)
        stored = await store.get(user, policy)
        assert cached is not None
        if stored is None:
            assert cached[0] == 0 and not cached[1].arms, (user, policy)
            continue
        assert cached[0] == stored.revision, (user, policy)
        assert same(cached[1], stored.state), (user, policy)
        checked += 1
    return checked


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_the_model_cache_equals_the_store_after_any_mix(tmp_path: Path, writer: str) -> None:
    rnd = random.Random(11)
    ids = itertools.count()
    cfg = config_mod.load(env={"OO_SHADOW_POLICIES": "egreedy-v2,linucb"}).scoring

    def engine_on(store: SqliteStore) -> ScoringEngine:
        return ScoringEngine(
            cfg, store, NoStoredFeatures(), ALL_FEATURES, decision_ids=lambda: f"d{next(ids)}"
        )

    store = SqliteStore.open(tmp_path / "c.db", decision_writer=writer)
    engine = engine_on(store)
    users = [f"u{i}" for i in range(12)]
    decisions: list[str] = []
    checked = 0
    try:
        for round_ in range(3):
            for _ in range(300):
                op = rnd.random()
                user = rnd.choice(users)
                if op < 0.5 or not decisions:
                    cmd = ScoreCommand(
                        user,
                        tuple(Candidate(f"t-{a}", a) for a in ARMS),
                        Inputs({"hour_of_day": float(rnd.randrange(24))}),
                        rnd.choice(POLICIES),
                    )
                    decisions.append((await engine.score(cmd)).record.decision_id)
                elif op < 0.95:
                    with contextlib.suppress(NotFound):  # the user was reset
                        await engine.reward(rnd.choice(decisions), float(rnd.random() < 0.5))
                else:
                    await engine.reset(user)
                if rnd.random() < 0.05:
                    await engine.drain()  # shadows scored, their views committed
            await engine.drain()
            checked += await assert_cache_equals_store(engine, store)
            if round_ < 2:  # restart: a new process reads the same file
                await engine.close()
                await store.close()
                store = SqliteStore.open(tmp_path / "c.db", decision_writer=writer)
                engine = engine_on(store)
                for user in users:  # warm the new cache from the store
                    for policy in POLICIES:
                        await engine.models.load(user, engine.policy(policy))
    finally:
        await engine.close()
        await store.close()
    assert checked > 50  # the comparison really ran over learned models


async def test_kill_9_under_load_loses_no_acknowledged_reward(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OO_")}
    env["OO_DECISION_FLUSH_MS"] = "5"
    exe = str(Path(sys.executable).parent / "oo-ml")
    args = [exe, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--no-ingest"]
    first = ServerProcess(args, env)
    answered: dict[str, float] = {}  # decision id -> when its Score answered
    rewarded: set[str] = set()  # acknowledged with applied=True
    stop = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)

            async def client(n: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        resp = await stub.Score(
                            pb.ScoreRequest(
                                user_id=f"user-{n}-{i % 7}",
                                candidates=[pb.Candidate(tip_id=a, arm=a) for a in ARMS],
                            )
                        )
                        answered[resp.decision_id] = time.monotonic()
                        if i % 2 == 0:
                            r = await stub.Reward(
                                pb.RewardRequest(decision_id=resp.decision_id, reward=1)
                            )
                            if r.applied:
                                rewarded.add(resp.decision_id)
                    except grpc.aio.AioRpcError:
                        return  # the server is gone

            clients = [asyncio.create_task(client(n)) for n in range(16)]
            while len(rewarded) < 300:  # noqa: ASYNC110 - polling the clients' progress
                await asyncio.sleep(0.05)
            first.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            first.proc.wait()
            stop.set()
            await asyncio.gather(*clients)
    finally:
        first.kill()

    second = ServerProcess(args, env)
    lost: list[str] = []
    try:
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = scoring_pb2_grpc.ScoringServiceStub(channel)
            for decision_id in answered:
                try:
                    r = await stub.Reward(pb.RewardRequest(decision_id=decision_id, reward=0))
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND, e
                    lost.append(decision_id)
                    continue
                if decision_id in rewarded:
                    assert not r.applied, f"acknowledged reward of {decision_id} was lost"
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=30) == 0
    finally:
        second.kill()
    assert not set(lost) & rewarded  # no acknowledged reward lost
    # Only decisions of the last flush interval (5 ms, plus the commit in flight under
    # load, for which a generous 500 ms is allowed) may be gone.
    old = [d for d in lost if killed_at - answered[d] > 0.5]
    assert not old, f"{len(old)} decisions answered over 0.5 s before the kill were lost"
    print(f"answered {len(answered)}, rewarded {len(rewarded)}, lost {len(lost)} of the last flush")


def test_the_server_makes_full_collections_rare(tmp_path: Path) -> None:
    """`oo-ml serve` raises the cyclic collector's third threshold (ADR 0031): full
    collections walked every cached model every few seconds, for a few hundred objects."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OO_")}
    exe = str(Path(sys.executable).parent / "oo-ml")
    args = [exe, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--no-ingest"]
    server = ServerProcess(args, env)
    try:
        assert server.stop(signal.SIGTERM) == 0
    finally:
        err = server.kill()
    assert re.search(r"cyclic collector thresholds \(\d+, \d+, 1000\)", err), err[-2000:]

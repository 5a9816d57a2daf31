"""The engine's background jobs cannot stall one another, with faults in a real SQLite store."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from oo_ml import config as config_mod
from oo_ml.domain.engine import Candidate, ScoreCommand, ScoringEngine
from oo_ml.domain.features import Inputs, NoStoredFeatures
from oo_ml.errors import TransientStoreError
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.sqlite.recent import RecentDecisions
from oo_ml.stores.sqlite.scoring import SqliteStore
from tests.helpers import assert_eventually

T0 = 1_700_000_000.0
WINDOW = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


_ENGINES: list[ScoringEngine] = []


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore.open(tmp_path / "upkeep.db")
    yield s
    while _ENGINES:  # their decision logs commit before the store closes
        await _ENGINES.pop().close()
    await s.close()


def engine_on(store: SqliteStore, clock: Clock, **env: str) -> ScoringEngine:
    settings = {
        "OO_REWARD_WINDOW_S": str(WINDOW),
        "OO_DEFAULT_REWARD": "0",
        "OO_SWEEP_INTERVAL_S": "0.05",
        "OO_PRIOR_REFRESH_S": "0.05",
        **env,
    }
    cfg = config_mod.load(env=settings).scoring
    engine = ScoringEngine(cfg, store, NoStoredFeatures(), ALL_FEATURES, clock=clock)
    _ENGINES.append(engine)
    return engine


async def score(engine: ScoringEngine, user: str) -> str:
    cmd = ScoreCommand(user, (Candidate("t1", "a"), Candidate("t2", "b")), Inputs({}))
    return (await engine.score(cmd)).record.decision_id


async def test_a_failing_prior_refresh_does_not_stop_the_sweeper(store: SqliteStore) -> None:
    clock = Clock()
    engine = engine_on(store, clock)
    ids = [await score(engine, f"u{i}") for i in range(3)]
    await engine.drain()
    clock.now += WINDOW + 1  # every decision is now past the reward window

    calls = 0

    async def broken_policy_states(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        raise TransientStoreError("sqlite: disk I/O error (injected)")

    store.policy_states = broken_policy_states  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(engine.run_background(stop))
    try:

        async def swept() -> None:
            for d in ids:
                stored = await store.get_decision(d)
                assert stored is not None and stored.reward.source == "default", d

        await assert_eventually(swept, 5)
        priors = next(j for j in engine.upkeep.status() if j.name == "priors")
        prune = next(j for j in engine.upkeep.status() if j.name == "prune")

        async def failing_and_counted() -> None:
            assert priors.consecutive_failures >= 3 and priors.failures_total == calls
            assert "disk I/O error" in priors.last_error
            assert prune.runs >= 1 and prune.failures_total == 0

        await assert_eventually(failing_and_counted, 10)
        assert not engine.upkeep.healthy  # the `oo.upkeep` health entry shows it
    finally:
        stop.set()
        await running


async def test_the_failing_job_backs_off(store: SqliteStore) -> None:
    engine = engine_on(store, Clock(), OO_PRIOR_REFRESH_S="30")
    job = next(j for j in engine.upkeep.status() if j.name == "priors")
    delays = []
    for n in range(1, 8):
        job.consecutive_failures = n
        delays.append(job.backoff_s())
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


async def test_an_undecodable_decision_is_set_aside_and_does_not_block_the_sweep(
    store: SqliteStore, tmp_path: Path
) -> None:
    clock = Clock()
    # What is tested is a record that does not decode on disk, so the store keeps no
    # copy in memory here (ADR 0025): a kept copy, made before the corruption, would be
    # the one read, and rewarded (the ADR says so).
    store.recent = RecentDecisions(0)
    engine = engine_on(store, clock)
    ids = [await score(engine, f"u{i}") for i in range(4)]
    await engine.drain()  # the decisions are committed, out of the write-behind buffer
    bad = ids[1]
    # Corrupt one decision's record on disk, as a bad migration or a bit flip would.
    with sqlite3.connect(tmp_path / "upkeep.db") as conn:
        conn.execute("UPDATE decisions SET data = x'ffffff' WHERE decision_id = ?", (bad,))
    clock.now += WINDOW + 1

    assert await engine.sweep_once() == 3
    assert engine.upkeep.set_aside == 1
    for d in ids:
        stored = await store.get_decision(d)
        if d == bad:
            assert stored is None  # moved out of the log
        else:
            assert stored is not None and stored.reward.reward == 0.0
    with sqlite3.connect(tmp_path / "upkeep.db") as conn:
        reason = conn.execute(
            "SELECT reason FROM decisions_set_aside WHERE decision_id = ?", (bad,)
        ).fetchone()
    assert reason is not None and "does not decode" in reason[0]

    # The next sweep neither trips on it again nor finds anything left to do.
    more = await score(engine, "u9")
    await engine.drain()
    clock.now += WINDOW + 1
    assert await engine.sweep_once() == 1
    assert engine.upkeep.set_aside == 1
    stored = await store.get_decision(more)
    assert stored is not None and stored.reward.source == "default"


async def test_a_young_prior_is_refreshed_when_the_data_grow(store: SqliteStore) -> None:
    """Besides its timer, the priors job is due as soon as the rewards learned since the
    prior was made reach PRIOR_REFRESH_GROWTH of those it pooled (`state.prior_due`)."""
    clock = Clock()
    engine = engine_on(store, clock, OO_PRIOR_REFRESH_S="3600")
    policy = engine.config.default_policy

    async def rewarded(users: range) -> None:
        for i in users:
            d = await score(engine, f"u{i}")
            await engine.drain()
            await engine.reward(d, 1.0)

    await rewarded(range(20))
    await engine.refresh_priors()
    prior = engine.models.priors[policy]
    assert prior.rewards == 20  # the rewards it pooled
    job = next(j for j in engine.upkeep.status() if j.name == "priors")
    job.next_at = float("inf")  # the timer is far away
    await rewarded(range(20, 21))
    assert job.next_at == float("inf")  # 1 < 10% of 20
    await rewarded(range(21, 22))
    assert job.next_at < float("inf")  # 2 = 10% of 20: due at the schedule's next look
    await engine.refresh_priors()
    assert engine.models.priors[policy].rewards == 22

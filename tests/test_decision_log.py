"""The write-behind decision log under a store that fails: bounded, no early `durable`,
nothing counted as dropped that lands, and the model cache not refilled by a stale read."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from oo_ml import config as config_mod
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate
from oo_ml.domain.engine.decision_log import DecisionLog
from oo_ml.domain.engine.models import Models
from oo_ml.domain.policies import build_policies
from oo_ml.errors import TransientStoreError
from oo_ml.stores.sqlite.scoring import SqliteStore


def record(i: int) -> DecisionRecord:
    return DecisionRecord(
        decision_id=f"d{i:04d}",
        user_id="u",
        policy="egreedy",
        feature_version="v1",
        x=np.ones(7),
        candidates=(LoggedCandidate("t", "a", 0.5, 1.0),),
        chosen_index=0,
        explored=False,
        created_at=1_700_000_000.0 + i,
    )


async def test_a_failing_store_keeps_the_log_bounded_and_durable_honest(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "l.db")
    real_commit = store.commit
    gate = asyncio.Event()
    failing = [True]

    async def commit(writes: Any) -> Any:
        await gate.wait()
        if failing[0]:
            raise TransientStoreError("sqlite: disk I/O error (injected)")
        return await real_commit(writes)

    store.commit = commit  # type: ignore[method-assign]
    log = DecisionLog(store, flush_ms=1, max_buffered=10)
    try:
        for i in range(5):
            log.append(record(i))
        await asyncio.sleep(0.01)  # the first commit (d0000..d0004) is under way
        waiting = asyncio.create_task(log.durable("d0000"))
        for i in range(5, 30):
            log.append(record(i))
        assert len(log.pending_records()) <= 10  # bounded while the store is away
        gate.set()  # the in-flight commit fails now and its writes come back
        await asyncio.sleep(0.05)
        assert not waiting.done()  # d0000 was in flight, never dropped: still waiting
        failing[0] = False
        await asyncio.wait_for(waiting, 10)
        await log.durable()
        kept = [i for i in range(30) if await store.get_decision(f"d{i:04d}") is not None]
        assert set(range(5)) <= set(kept)  # what was in flight was never dropped
        assert log.counters.dropped == 30 - len(kept)  # counted exactly what was lost
        assert log.counters.flushed == len(kept)
    finally:
        gate.set()
        failing[0] = False
        await log.close()
        await store.close()


async def test_a_read_racing_a_reset_does_not_refill_the_cache(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "m.db")
    config = config_mod.load(env={}).scoring
    models = Models(store, config)
    policy = build_policies(config)["egreedy"]
    real_get = store.get
    release = asyncio.Event()

    async def slow_get(user_id: str, policy_name: str) -> Any:
        found = await real_get(user_id, policy_name)
        await release.wait()
        return found

    store.get = slow_get  # type: ignore[method-assign]
    try:
        reading = asyncio.create_task(models.load("u", policy))
        await asyncio.sleep(0.01)
        models.forget_user("u")  # a Reset lands while the read is under way
        release.set()
        await reading
        assert models.cached("u", "egreedy") is None  # the pre-reset read is not kept
    finally:
        await store.close()

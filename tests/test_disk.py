"""Bounded disk: a decision record of ten candidates in at most half a kilobyte, the log
capped by size (oldest rewarded first), and the WAL checkpointed under load."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from oo.state.v1 import state_pb2
from oo_ml import config as config_mod
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate
from oo_ml.domain.engine import Candidate, ScoreCommand, ScoringEngine
from oo_ml.domain.features import Inputs, NoStoredFeatures
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.codec import DecisionKey, decode_decision, encode_decision
from oo_ml.stores.sqlite.scoring import SqliteStore

TEN = tuple(Candidate(f"tip-{i:03d}", f"family-{i % 4}") for i in range(10))


def engine_on(store: SqliteStore, **env: str) -> ScoringEngine:
    ids = itertools.count()
    cfg = config_mod.load(env=env).scoring
    return ScoringEngine(
        cfg, store, NoStoredFeatures(), ALL_FEATURES, decision_ids=lambda: f"{next(ids):032x}"
    )


def test_a_decision_round_trips_in_format_2_and_format_1_still_reads() -> None:
    rng = np.random.default_rng(3)
    record = DecisionRecord(
        decision_id="d" * 32,
        user_id="ann",
        policy="linucb",
        feature_version="v2",
        x=rng.random(12),
        candidates=tuple(
            LoggedCandidate(f"t{i}", f"a{i}" if i % 2 else f"t{i}", float(rng.random()), 0.1)
            for i in range(10)
        ),
        chosen_index=3,
        explored=True,
        created_at=1_700_000_000.25,
    )
    key = DecisionKey(record.decision_id, record.user_id, record.policy, record.created_at)
    back = decode_decision(encode_decision(record), key)
    assert back.candidates[3].arm == record.candidates[3].arm and back.chosen_index == 3
    assert [c.arm for c in back.candidates] == [c.arm for c in record.candidates]
    assert np.allclose(back.x, record.x, rtol=1e-6)  # stored as float32
    assert np.allclose([c.score for c in back.candidates], [c.score for c in record.candidates])
    assert back.decision_id == record.decision_id and back.created_at == record.created_at
    # A record written before format 2 (every field in the blob, float64) reads the same.
    old = state_pb2.Decision(
        format_version=1,
        decision_id="old",
        user_id="bob",
        policy="egreedy",
        feature_version="v1",
        x=[1.0, 0.5],
        chosen_index=0,
        created_at_ms=1_000,
    )
    old.candidates.add(tip_id="t", arm="a", score=0.25, propensity=1.0)
    legacy = decode_decision(old.SerializeToString())
    assert (legacy.decision_id, legacy.user_id, legacy.created_at) == ("old", "bob", 1.0)
    assert legacy.x.tolist() == [1.0, 0.5] and legacy.candidates[0].propensity == 1.0


async def test_a_ten_candidate_decision_takes_at_most_half_a_kilobyte(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "d.db")
    engine = engine_on(store)
    try:
        for i in range(3000):
            await engine.score(
                ScoreCommand(f"user-{i % 500}", TEN, Inputs({"hour_of_day": 9.0}), "linucb")
            )
        await engine.close()
        rows, size = await store.decision_log_size()
    finally:
        await store.close()
    assert rows == 3000
    # Table, its four indexes and the page overhead, measured from SQLite's own pages.
    assert size / rows <= 512, f"{size / rows:.0f} bytes a decision"


async def test_the_log_is_capped_by_size_oldest_rewarded_first(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "cap.db")
    engine = engine_on(store, OO_DECISION_LOG_MAX_MB="0.2")  # about 500 decisions
    try:
        ids = []
        for i in range(1500):
            r = await engine.score(ScoreCommand(f"u{i % 50}", TEN, Inputs({}), "egreedy"))
            ids.append(r.record.decision_id)
        await engine.drain()
        for d in ids[:1200]:  # in order: the first rewarded are the oldest rewards
            await engine.reward(d, 1.0)
        forgotten = await engine.upkeep.prune()
        rows, size = await store.decision_log_size()
        assert size <= 0.2 * 1024 * 1024 and forgotten > 0 and rows + forgotten == 1500
        assert engine.upkeep.pruned_for_size == forgotten
        assert await store.get_decision(ids[0]) is None  # the oldest reward went first
        assert await store.get_decision(ids[1199]) is not None  # the newest is kept
        for d in ids[1200:]:  # pending decisions are never forgotten for size
            assert await store.get_decision(d) is not None
    finally:
        await engine.close()
        await store.close()


async def test_the_wal_is_checkpointed_by_upkeep(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "w.db")
    engine = engine_on(store)
    try:
        for i in range(300):
            await engine.score(ScoreCommand(f"u{i}", TEN, Inputs({}), "egreedy"))
        await engine.drain()
        wal = tmp_path / "w.db-wal"
        assert wal.stat().st_size > 0
        job = next(j for j in engine.upkeep.status() if j.name == "checkpoint")
        await engine.upkeep._run_job(job, store.checkpoint)
        assert job.failures_total == 0 and wal.stat().st_size == 0
    finally:
        await engine.close()
        await store.close()

"""The SQLite store keeps the decisions it committed last for the Reward join
(`stores.sqlite.recent`): a kept decision reads back as the file holds it, without the
reader thread, and a stale one (another process rewarded or reset it) never leads to a
reward learned twice or to a decision revived."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from oo_ml.config import ScoringConfig
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate, ShadowView
from oo_ml.domain.engine import ScoringEngine
from oo_ml.domain.engine.types import Candidate, ScoreCommand
from oo_ml.domain.features import Inputs, NoStoredFeatures
from oo_ml.domain.ports import AttachShadows, InsertDecision, StoredDecision
from oo_ml.errors import FailedPrecondition, NotFound
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.codec import encode_shadow_views
from oo_ml.stores.sqlite.recent import ENTRY_OVERHEAD_BYTES, RecentDecisions
from oo_ml.stores.sqlite.scoring import SqliteStore, _decision_row


def rec(i: int, user: str = "u") -> DecisionRecord:
    return DecisionRecord(
        decision_id=f"{i:032x}",
        user_id=user,
        policy="egreedy-v2",
        feature_version="v2",
        # Not float32 numbers: the file keeps float32, and so must what is kept.
        x=np.arange(12, dtype=np.float64) / 7,
        candidates=(
            LoggedCandidate("t1", "focus", 1 / 3, 0.7, "g1", "p1"),
            LoggedCandidate("t2", "break", 0.1, 0.3),
        ),
        chosen_index=0,
        explored=False,
        created_at=1000.0 + i,
    )


def same(a: StoredDecision, b: StoredDecision) -> None:
    for f in dataclasses.fields(DecisionRecord):
        va, vb = getattr(a.record, f.name), getattr(b.record, f.name)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and va.tobytes() == vb.tobytes(), f.name
        elif f.name == "shadow_vectors":
            assert va.keys() == vb.keys()
            assert all(va[k].tobytes() == vb[k].tobytes() for k in va)
        else:
            assert va == vb, f.name
    assert a.reward == b.reward


@pytest.fixture(params=["thread", "process"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore.open(tmp_path / "x.db", decision_writer=request.param)
    yield s
    await s.close()


async def test_a_kept_decision_reads_back_as_the_file_holds_it_without_the_reader(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = ShadowView("linucb", "break", 0.3, (0.25, 0.75), (0.5, 0.125))
    await store.commit([InsertDecision(rec(1)), InsertDecision(rec(2))])
    await store.commit([AttachShadows(rec(1).decision_id, (view,), {"v1": np.ones(7) / 3})])
    read = store.db.read

    async def no_reader(fn: Any) -> Any:
        raise AssertionError("a kept decision went to the reader thread")

    monkeypatch.setattr(store.db, "read", no_reader)
    kept = await store.get_decision(rec(1).decision_id)
    monkeypatch.setattr(store.db, "read", read)
    assert kept is not None and store.recent.hits == 1
    assert kept.record.shadows == (view,)
    # It served its one read: the next comes from the file, and must be the same.
    from_file = await store.get_decision(rec(1).decision_id)
    assert from_file is not None and store.recent.hits == 1
    same(kept, from_file)
    assert kept.record.x.tolist() != rec(1).x.tolist()  # float32, as stored
    # And without shadow views.
    kept2 = await store.get_decision(rec(2).decision_id)
    assert store.recent.hits == 2
    store.recent.discard(rec(2).decision_id)
    from_file2 = await store.get_decision(rec(2).decision_id)
    assert kept2 is not None and from_file2 is not None
    same(kept2, from_file2)


async def test_a_reset_voids_the_users_kept_decisions(store: SqliteStore) -> None:
    await store.commit([InsertDecision(rec(1, "ann")), InsertDecision(rec(2, "bob"))])
    await store.reset_user("ann")
    assert await store.get_decision(rec(1, "ann").decision_id) is None
    assert store.recent.hits == 0
    assert await store.get_decision(rec(2, "bob").decision_id) is not None
    assert store.recent.hits == 1
    # A decision logged after the reset is kept again.
    await store.commit([InsertDecision(rec(3, "ann"))])
    assert await store.get_decision(rec(3, "ann").decision_id) is not None
    assert store.recent.hits == 2


def test_the_budget_drops_the_oldest_first_and_zero_keeps_nothing() -> None:
    rows = [_decision_row(rec(i)) for i in range(10)]
    each = len(rows[0][6]) + ENTRY_OVERHEAD_BYTES
    recent = RecentDecisions(4 * each)
    recent.keep(rows)
    assert len(recent) == 4 and recent.bytes == 4 * each and recent.evictions == 6
    assert recent.take(rec(5).decision_id) is None
    assert recent.take(rec(6).decision_id) is not None
    off = RecentDecisions(0)
    off.keep(rows)
    assert len(off) == 0 and off.take(rec(9).decision_id) is None


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_decision_another_process_rewarded_is_not_learned_twice(
    tmp_path: Path, writer: str
) -> None:
    """A's kept copy of its decision is stale once B (another worker on the file) has
    rewarded it: A's reward must answer applied=False and leave the model as B left it."""
    sa = SqliteStore.open(tmp_path / "x.db", decision_writer=writer)
    sb = SqliteStore.open(tmp_path / "x.db")
    cfg = ScoringConfig(default_policy="egreedy-v2")
    ea = ScoringEngine(cfg, sa, NoStoredFeatures(), ALL_FEATURES)
    eb = ScoringEngine(cfg, sb, NoStoredFeatures(), ALL_FEATURES)
    cmd = ScoreCommand("u", tuple(Candidate(f"t-{a}", a) for a in ("x", "y")), Inputs({}), "")
    record = (await ea.score(cmd)).record
    await ea.log.durable()
    assert len(sa.recent) == 1
    assert (await eb.reward(record.decision_id, 1.0)).applied
    result = await ea.reward(record.decision_id, 1.0)
    assert not result.applied
    assert sa.recent.hits == 1  # A did read its stale copy first
    assert ea.conflicts == 1  # and its commit refused it
    stored = await sa.get("u", ea.policy("").name)
    assert stored is not None
    assert stored.state.arms[record.chosen.arm].rewarded == 1
    for e in (ea, eb):
        await e.close()
    for s in (sa, sb):
        await s.close()


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_decision_another_process_reset_is_not_found(tmp_path: Path, writer: str) -> None:
    sa = SqliteStore.open(tmp_path / "x.db", decision_writer=writer)
    sb = SqliteStore.open(tmp_path / "x.db")
    cfg = ScoringConfig(default_policy="egreedy-v2")
    ea = ScoringEngine(cfg, sa, NoStoredFeatures(), ALL_FEATURES)
    cmd = ScoreCommand("u", tuple(Candidate(f"t-{a}", a) for a in ("x", "y")), Inputs({}), "")
    record = (await ea.score(cmd)).record
    await ea.log.durable()
    await sb.reset_user("u")
    with pytest.raises(NotFound):
        await ea.reward(record.decision_id, 1.0)
    assert sa.recent.hits == 1
    assert await sa.get("u", ea.policy("").name) is None
    await ea.close()
    for s in (sa, sb):
        await s.close()


async def test_a_late_duplicate_of_another_process_reward_is_answered_as_one(
    tmp_path: Path,
) -> None:
    """Past the reward window, A's kept (unrewarded-looking) copy must not turn B's
    earlier reward into FAILED_PRECONDITION: the duplicate is applied=False, as before."""
    sa, sb = SqliteStore.open(tmp_path / "x.db"), SqliteStore.open(tmp_path / "x.db")
    now = [1000.0]
    cfg = ScoringConfig(default_policy="egreedy-v2")
    ea = ScoringEngine(cfg, sa, NoStoredFeatures(), ALL_FEATURES, clock=lambda: now[0])
    eb = ScoringEngine(cfg, sb, NoStoredFeatures(), ALL_FEATURES, clock=lambda: now[0])
    cmd = ScoreCommand("u", tuple(Candidate(f"t-{a}", a) for a in ("x", "y")), Inputs({}), "")
    rewarded, never = (await ea.score(cmd)).record, (await ea.score(cmd)).record
    gone = (await ea.score(dataclasses.replace(cmd, user_id="v"))).record
    await ea.log.durable()
    assert (await eb.reward(rewarded.decision_id, 1.0)).applied
    await sb.reset_user("v")
    now[0] += cfg.reward_window_s + 1
    assert not (await ea.reward(rewarded.decision_id, 1.0)).applied
    assert sa.recent.hits == 1
    with pytest.raises(FailedPrecondition):  # never rewarded, and too old: as before
        await ea.reward(never.decision_id, 1.0)
    with pytest.raises(NotFound):  # reset by B meanwhile: gone, as the file says
        await ea.reward(gone.decision_id, 1.0)
    for e in (ea, eb):
        await e.close()
    for s in (sa, sb):
        await s.close()


def test_shadow_views_and_resets_stay_within_bounds() -> None:
    rows = [_decision_row(rec(i)) for i in range(2)]
    each = len(rows[0][6]) + ENTRY_OVERHEAD_BYTES
    view = ShadowView("linucb", "break", 0.3, (0.25, 0.75), (0.5, 0.125))
    views = encode_shadow_views((view,), {})
    recent = RecentDecisions(2 * each + len(views) - 1)
    recent.keep(rows)
    recent.attach([(rec(1).decision_id, views)])  # the newest grows past the budget
    assert recent.bytes <= recent.budget_bytes and len(recent) == 1
    kept = recent.take(rec(1).decision_id)  # the oldest went
    assert kept is not None and kept.record.shadows == (view,)
    off = RecentDecisions(0)
    for i in range(3000):
        off.forget_user(f"u{i}")
    assert len(off._reset_at) == 0  # nothing kept, so nothing to void


async def test_rewards_through_the_engine_read_their_decisions_from_memory(
    tmp_path: Path,
) -> None:
    store = SqliteStore.open(tmp_path / "x.db")
    engine = ScoringEngine(
        ScoringConfig(default_policy="egreedy-v2"), store, NoStoredFeatures(), ALL_FEATURES
    )
    cands = tuple(Candidate(f"t-{a}", a) for a in ("x", "y", "z"))
    ids = [
        (await engine.score(ScoreCommand(f"u{i}", cands, Inputs({}), ""))).record.decision_id
        for i in range(20)
    ]
    await engine.log.durable()
    for d in ids:
        assert (await engine.reward(d, 1.0)).applied
        assert not (await engine.reward(d, 1.0)).applied  # from the file: rewarded
    assert store.recent.hits == 20 and len(store.recent) == 0
    await engine.close()
    await store.close()


async def test_the_cache_shows_in_the_metrics(tmp_path: Path) -> None:
    from oo_ml.app.metrics import _engine_families

    store = SqliteStore.open(tmp_path / "x.db")
    engine = ScoringEngine(
        ScoringConfig(default_policy="egreedy-v2"), store, NoStoredFeatures(), ALL_FEATURES
    )
    cands = tuple(Candidate(f"t-{a}", a) for a in ("x", "y"))
    ids = [
        (await engine.score(ScoreCommand(f"u{i}", cands, Inputs({}), ""))).record.decision_id
        for i in range(3)
    ]
    await engine.log.durable()
    await engine.reward(ids[0], 1.0)
    values = {
        s.name: s.value
        for family in _engine_families(engine)
        for s in family.samples
        if s.name.startswith("oo_decision_cache")
    }
    assert values["oo_decision_cache_hits_total"] == 1
    assert values["oo_decision_cache_misses_total"] == 0
    assert values["oo_decision_cache_entries"] == 2
    assert values["oo_decision_cache_bytes"] == store.recent.bytes > 0
    await engine.close()
    await store.close()

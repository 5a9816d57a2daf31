"""Rewards' writes committed by the writer child process (ADR 0027), on a real SQLite file.

What must hold: the child commits a reward's writes exactly as the writer thread does
(the same rows, revisions, change feed and conditions); a transaction whose condition
fails is rolled back alone, the others of its frame commit; concurrent rewards share
frames, a lone caller is never held back, and nobody waits for ever on a writer that
closes or dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from oo_ml import config as config_mod
from oo_ml.domain.engine import Candidate, ScoreCommand, ScoringEngine
from oo_ml.domain.features import Inputs, NoStoredFeatures
from oo_ml.domain.ports import AddOffPolicy, InsertDecision, MarkRewarded, PutState
from oo_ml.domain.state import PolicyState, empty_state
from oo_ml.errors import Conflict, TransientStoreError
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.sqlite import decision_writer
from oo_ml.stores.sqlite.scoring import SqliteStore
from tests.test_hot_path import assert_cache_equals_store
from tests.test_store_shared import rec


def state(reward: float = 1.0) -> PolicyState:
    s = empty_state("p", "v1", 7, 1.0).with_arms(["a", "other"])
    return s.learned("a", np.arange(7, dtype=np.float64) / 7, reward)


def reward_writes(i: int, user: str = "u", revision: int = 0) -> list[PutState | MarkRewarded]:
    return [
        MarkRewarded(rec(i, user=user).decision_id, 1.0, 200.0 + i, "explicit"),
        PutState(user, "p", revision, state()),
    ]


def table(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def logged(store: SqliteStore, n: int, users: int = 1) -> None:
    """n decisions, for users u0.. (or "u" for one user)."""
    await store.commit(
        [InsertDecision(rec(i, user="u" if users == 1 else f"u{i % users}")) for i in range(n)]
    )


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_reward_commits_the_same_rows_through_either_writer(
    tmp_path: Path, writer: str
) -> None:
    path = tmp_path / "s.db"
    store = SqliteStore.open(path, decision_writer=writer)
    try:
        await logged(store, 3)
        assert (store.writer is not None) == (writer == "process")
        first = [*reward_writes(0), AddOffPolicy("p", "q", 2.0, 1.0, 0.5)]
        assert await store.commit(first) == {("u", "p"): 1}
        assert await store.commit(reward_writes(1, revision=1)) == {("u", "p"): 2}
        # Conditions: a stale revision, a decision rewarded already. Either fails the
        # whole transaction: its other write is rolled back with it.
        with pytest.raises(Conflict):
            await store.commit(reward_writes(2, revision=1))
        with pytest.raises(Conflict):
            await store.commit(reward_writes(1, revision=2))
        stored = await store.get("u", "p")
        assert stored is not None and stored.revision == 2
        rewarded = table(path, "SELECT decision_id, reward, reward_source FROM decisions")
        assert sorted(rewarded) == [
            (rec(0).decision_id, 1.0, "explicit"),
            (rec(1).decision_id, 1.0, "explicit"),
            (rec(2).decision_id, None, ""),
        ]
        changes = table(path, "SELECT user_id, policy, revision, origin FROM changes")
        assert changes == [("u", "p", 1, store.db.origin), ("u", "p", 2, store.db.origin)]
        sums = table(path, "SELECT n, weight_sum, weighted_reward_sum, dr_sum FROM off_policy")
        assert sums == [(1, 2.0, 2.0, 0.5)]
    finally:
        await store.close()


async def test_a_failed_condition_fails_only_its_own_transaction_in_a_frame(
    tmp_path: Path,
) -> None:
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        await logged(store, 40, users=40)
        assert store.writer is not None
        frames = store.writer.frames
        # Forty rewards at once, one of them against a revision that does not exist.
        outcomes = await asyncio.gather(
            *(
                store.commit(reward_writes(i, user=f"u{i}", revision=5 if i == 17 else 0))
                for i in range(40)
            ),
            return_exceptions=True,
        )
        assert store.writer.frames - frames <= 2  # they shared frames (and one fsync each)
        assert isinstance(outcomes[17], Conflict)
        assert all(o == {(f"u{i}", "p"): 1} for i, o in enumerate(outcomes) if i != 17)
        got = await store.get_decision(rec(17, user="u17").decision_id)
        assert got is not None and got.reward.reward is None  # rolled back with its state
        assert await store.get("u17", "p") is None
    finally:
        await store.close()


@pytest.fixture
def slow_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pacing far longer than any commit, whatever the disk: a frame that could wait does."""
    monkeypatch.setattr(decision_writer, "_TX_PACE_S", 0.05)


@pytest.mark.usefixtures("slow_pace")
async def test_a_lone_caller_is_never_held_back(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        await logged(store, 20)
        assert store.writer is not None
        frames, paced = store.writer.frames, store.writer.paced
        for i in range(20):  # each reward waits for the one before: nothing to group
            await store.commit(reward_writes(i, revision=i))
        assert (store.writer.frames - frames, store.writer.paced - paced) == (20, 0)
    finally:
        await store.close()


@pytest.mark.usefixtures("slow_pace")
async def test_a_stream_of_rewards_is_paced_into_shared_frames(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        await logged(store, 80, users=8)
        assert store.writer is not None
        frames = store.writer.frames

        async def caller(u: int) -> None:
            # Eight callers, each with its next reward as soon as the last is answered,
            # started apart so that they do not arrive together.
            await asyncio.sleep(0.003 * u)
            for k in range(10):
                i = 8 * k + u
                await store.commit(reward_writes(i, user=f"u{u}", revision=k))

        await asyncio.gather(*(caller(u) for u in range(8)))
        sent = store.writer.frames - frames
        assert store.writer.paced > 0
        assert sent <= 40, f"{sent} frames for 80 rewards"
        assert table(tmp_path / "s.db", "SELECT count(*) FROM decisions WHERE reward = 1") == [
            (80,)
        ]
    finally:
        await store.close()


async def test_closing_answers_the_rewards_still_waiting(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    await logged(store, 30, users=30)
    assert store.writer is not None
    pending = [
        asyncio.ensure_future(store.commit(reward_writes(i, user=f"u{i}"))) for i in range(30)
    ]
    await asyncio.sleep(0)
    await store.writer.close()
    done, _ = await asyncio.wait(pending, timeout=10)
    assert len(done) == 30  # committed, or refused because the writer closed; none hangs
    for task in done:
        if task.exception() is not None:
            assert isinstance(task.exception(), TransientStoreError)
    await store.close()


async def test_a_dead_child_is_replaced_for_the_next_reward(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        await logged(store, 2)
        assert store.writer is not None and store.writer.pid is not None
        os.kill(store.writer.pid, signal.SIGKILL)
        await asyncio.sleep(0.2)  # the child is gone before the reward is sent
        assert await store.commit(reward_writes(0)) == {("u", "p"): 1}
        assert store.writer.starts == 2
    finally:
        await store.close()


async def test_a_reward_whose_commit_lands_unanswered_is_learned_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that dies after its COMMIT and before its answer: the reward stands, but
    the engine heard TransientStoreError and keeps its cached model (warm Scores must not
    need the store). The user's next reward loses its compare-and-set on that model,
    reads the store and applies: each reward is learned once, and the cache is the store
    again."""
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    cfg = config_mod.load(env={}).scoring
    engine = ScoringEngine(cfg, store, NoStoredFeatures(), ALL_FEATURES)
    try:
        cmd = ScoreCommand("u", tuple(Candidate(f"t-{a}", a) for a in ("x", "y")), Inputs({}), "")
        ids = [(await engine.score(cmd)).record.decision_id for _ in range(3)]
        await engine.reward(ids[0], 1.0)
        real = SqliteStore.commit

        async def lands_then_fails(self: SqliteStore, writes):  # type: ignore[no-untyped-def]
            out = await real(self, writes)
            if any(isinstance(w, MarkRewarded) for w in writes):
                raise TransientStoreError("the writer ended before it answered (injected)")
            return out

        monkeypatch.setattr(SqliteStore, "commit", lands_then_fails)
        with pytest.raises(TransientStoreError):
            await engine.reward(ids[1], 1.0)
        monkeypatch.undo()
        conflicts = engine.conflicts
        result = await engine.reward(ids[2], 0.0)
        assert result.applied
        assert engine.conflicts == conflicts + 1  # the cached model was one reward behind
        stored = await store.get("u", engine.policy("").name)
        assert stored is not None and stored.revision == 3 and stored.state.rewards == 3
        assert await assert_cache_equals_store(engine, store) == 1
        # The reward that was answered as failed is not applied twice on a retry.
        assert not (await engine.reward(ids[1], 1.0)).applied
    finally:
        await engine.close()
        await store.close()


@pytest.mark.parametrize("where", ["pacing", "lock"])
async def test_a_sender_cancelled_while_waiting_answers_everyone_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The loop going away cancels the task that sends frames: callers queued behind it
    hear so, wherever it was waiting."""
    monkeypatch.setattr(decision_writer, "_TX_PACE_S", 5.0)
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        await logged(store, 4, users=4)
        writer = store.writer
        assert writer is not None
        # Two at once make a frame of two, after which the next frame would be paced.
        await asyncio.gather(*(store.commit(reward_writes(i, user=f"u{i}")) for i in (0, 1)))
        lock = writer._lock
        assert lock is not None
        if where == "lock":
            await lock.acquire()  # as a decision log batch would hold it
        try:
            queued = [
                asyncio.ensure_future(store.commit(reward_writes(i, user=f"u{i}"))) for i in (2, 3)
            ]
            await asyncio.sleep(0.05)
            assert writer._sender is not None and not writer._sender.done()
            writer._sender.cancel()
            done, _ = await asyncio.wait(queued, timeout=2)
            assert len(done) == 2
            assert all(isinstance(t.exception(), TransientStoreError) for t in done)
        finally:
            if lock.locked():
                lock.release()
        # The writer still serves: the next reward starts a new sender.
        assert await store.commit(reward_writes(2, user="u2")) == {("u2", "p"): 1}
    finally:
        await store.close()


async def test_a_reward_waits_behind_a_long_write_of_the_thread(tmp_path: Path) -> None:
    """The writer thread and the child share the file's write lock: a reward waits for a
    long thread transaction (a big prune) instead of failing after SQLite's usual 5 s."""
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        await logged(store, 1)
        long_write = asyncio.ensure_future(store.db.run(lambda conn: time.sleep(5.5)))
        await asyncio.sleep(0.2)  # the thread holds the lock
        assert await store.commit(reward_writes(0)) == {("u", "p"): 1}
        assert long_write.done()
    finally:
        await store.close()

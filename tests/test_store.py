"""The storage ports: compare-and-set semantics for both StateStores, and the SQLite store's
atomic commits under group commit."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate, RewardState
from oo_ml.domain.ports import InsertDecision, MarkRewarded, PutState, StateStore
from oo_ml.domain.state import PolicyState
from oo_ml.errors import Conflict
from oo_ml.stores.memory import MemoryStateStore
from oo_ml.stores.sqlite import db as sqlite_db
from oo_ml.stores.sqlite import decision_writer, scoring
from oo_ml.stores.sqlite.scoring import SqliteStore


def st(decisions: int) -> PolicyState:
    """A distinguishable state: its decision counter is its identity."""
    return PolicyState("p", "v1", 7, 1.0, decisions=decisions)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore.open(tmp_path / "s.db")
    yield store
    await store.close()


@pytest.fixture(params=["memory", "sqlite"])
async def state_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        yield MemoryStateStore()
        return
    store = SqliteStore.open(tmp_path / "cas.db")
    yield store
    await store.close()


async def test_compare_and_set_on_revision(state_store: StateStore) -> None:
    assert await state_store.get("u", "p") is None
    assert await state_store.compare_and_set("u", "p", 0, st(1)) == 1
    assert await state_store.compare_and_set("u", "p", 0, st(2)) is None  # exists already
    assert await state_store.compare_and_set("u", "p", 1, st(3)) == 2
    assert await state_store.compare_and_set("u", "p", 1, st(4)) is None
    got = await state_store.get("u", "p")
    assert got is not None and (got.revision, got.state) == (2, st(3))


async def test_concurrent_cas_lets_exactly_one_writer_win(state_store: StateStore) -> None:
    await state_store.compare_and_set("u", "p", 0, st(0))
    wins = await asyncio.gather(
        *(state_store.compare_and_set("u", "p", 1, st(10 + i)) for i in range(20))
    )
    assert sum(w is not None for w in wins) == 1


def decision(i: int, arm: str = "arm") -> InsertDecision:
    return InsertDecision(
        DecisionRecord(
            decision_id=f"d{i}",
            user_id="u",
            policy="p",
            feature_version="v1",
            x=np.ones(7),
            candidates=(LoggedCandidate("t", arm, 0.5, 1.0),),
            chosen_index=0,
            explored=False,
            created_at=100.0 + i,
        )
    )


async def test_a_failed_condition_applies_nothing_of_its_commit(sqlite_store: SqliteStore) -> None:
    await sqlite_store.commit([decision(1), PutState("u", "p", 0, st(1))])
    await sqlite_store.commit(
        [MarkRewarded("d1", 1.0, 200.0, "explicit"), PutState("u", "p", 1, st(2))]
    )
    with pytest.raises(Conflict):
        # The decision is rewarded already: the state write in the same commit must not land.
        await sqlite_store.commit(
            [PutState("u", "p", 2, st(3)), MarkRewarded("d1", 0.0, 300.0, "explicit")]
        )
    got = await sqlite_store.get("u", "p")
    assert got is not None and got.state == st(2)
    stored = await sqlite_store.get_decision("d1")
    assert stored is not None and stored.reward == RewardState(1.0, 200.0, "explicit")


async def test_one_failing_operation_does_not_fail_its_batch(sqlite_store: SqliteStore) -> None:
    def boom(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO state (user_id, policy, revision, data, updated_at) VALUES ('x','p',1,x'00',0)"
        )
        raise RuntimeError("boom")

    results = await asyncio.gather(
        *(sqlite_store.commit([decision(i)]) for i in range(50)),
        sqlite_store.db.run(boom),
        return_exceptions=True,
    )
    assert isinstance(results[-1], RuntimeError)
    assert all(not isinstance(r, BaseException) for r in results[:-1])
    assert await sqlite_store.get("x", "p") is None  # the failed operation's write was rolled back
    assert len(await sqlite_store.pending_before(1e9, 100)) == 50


async def test_writes_survive_reopening(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "r.db")
    await store.commit([decision(1), PutState("u", "p", 0, st(1))])
    await store.close()
    await store.close()  # idempotent
    again = SqliteStore.open(tmp_path / "r.db")
    try:
        assert (await again.get("u", "p")) is not None
        assert (await again.get_decision("d1")) is not None
    finally:
        await again.close()


async def test_a_caller_that_gives_up_does_not_break_the_store(sqlite_store: SqliteStore) -> None:
    """A cancelled caller (a gRPC deadline) must neither kill the writer or the reader nor
    leave its write behind if it had not started."""
    import time

    for run in (sqlite_store.db.run, sqlite_store.db.read):
        busy = asyncio.create_task(run(lambda conn: time.sleep(0.2)))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(
            sqlite_store.commit([PutState("gone", "p", 0, st(9))])
            if run is sqlite_store.db.run
            else run(lambda conn: 1)
        )
        await asyncio.sleep(0.01)
        queued.cancel()
        await busy
        with pytest.raises(asyncio.CancelledError):
            await queued
    assert await asyncio.wait_for(sqlite_store.commit([PutState("u", "p", 0, st(5))]), 5)
    assert await asyncio.wait_for(sqlite_store.get("u", "p"), 5) is not None
    assert await sqlite_store.get("gone", "p") is None  # cancelled before it ran: not applied


async def queue_behind_a_held_thread(
    run: Callable[[Callable[[sqlite3.Connection], Any]], Coroutine[Any, Any, Any]],
    fns: list[Callable[[sqlite3.Connection], Any]],
) -> tuple[threading.Event, asyncio.Task[Any], list[asyncio.Task[Any]]]:
    """One operation holds the SQLite thread until the returned gate is set; `fns` are
    queued behind it, so the thread takes them as one batch."""
    gate = threading.Event()

    def hold(conn: sqlite3.Connection) -> bool:
        return gate.wait(5)

    first = asyncio.create_task(run(hold))
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(run(fn)) for fn in fns]
    await asyncio.sleep(0.05)  # all queued behind the first
    return gate, first, rest


async def test_a_batch_of_operations_wakes_the_loop_once(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite threads answer a whole batch with one loop wake-up, not one per
    operation (each wake-up is a self-pipe write and a loop pass, taken under the GIL)."""
    loop = asyncio.get_running_loop()
    wakeups = 0
    call = loop.call_soon_threadsafe

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal wakeups
        wakeups += 1
        return call(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)

    def value(i: int) -> Callable[[sqlite3.Connection], int]:
        return lambda conn: i

    for run in (sqlite_store.db.run, sqlite_store.db.read):
        gate, first, rest = await queue_behind_a_held_thread(run, [value(i) for i in range(50)])
        wakeups = 0
        gate.set()
        assert await first
        assert await asyncio.gather(*rest) == list(range(50))
        # The first operation's answer, then the 50 queued ones in one batch (writes) or
        # in batches of sqlite_db._MAX_READS (reads); not 51, one each.
        assert wakeups <= 2 + 50 // sqlite_db._MAX_READS, wakeups


async def test_an_operation_that_cannot_be_answered_does_not_strand_its_batch(
    sqlite_store: SqliteStore,
) -> None:
    """A StopIteration cannot be set on a future. Answered in one batch, it must neither
    hang the operations after it (committed ones included) nor reach its caller raw."""

    def op(i: int) -> Callable[[sqlite3.Connection], int]:
        def fn(conn: sqlite3.Connection) -> int:
            if i == 3:
                raise StopIteration
            return i

        return fn

    for run in (sqlite_store.db.run, sqlite_store.db.read):
        gate, first, rest = await queue_behind_a_held_thread(run, [op(i) for i in range(7)])
        gate.set()
        assert await first
        done = await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), 5)
        assert [d for i, d in enumerate(done) if i != 3] == [0, 1, 2, 4, 5, 6]
        assert isinstance(done[3], RuntimeError)


async def test_pruning_forgets_old_rewarded_decisions_and_keeps_pending_ones(
    sqlite_store: SqliteStore,
) -> None:
    await sqlite_store.commit([decision(1), decision(2), decision(3)])
    await sqlite_store.commit([MarkRewarded("d1", 1.0, 100.0, "explicit")])
    await sqlite_store.commit([MarkRewarded("d2", 1.0, 500.0, "explicit")])
    assert await sqlite_store.prune_decisions(rewarded_before=200.0) == 1
    assert await sqlite_store.get_decision("d1") is None
    assert await sqlite_store.get_decision("d2") is not None
    assert await sqlite_store.get_decision("d3") is not None  # pending: kept


def test_wal_mode_is_retried_while_another_opener_holds_the_file(tmp_path: Path) -> None:
    """Switching to WAL can answer "database is locked" at once, without the busy
    handler, while another process opens the same new file (seen with two workers):
    the switch is retried, not the start failed. SQLite cannot be made to do that on
    demand, so the first two answers come from a wrapper around a real connection."""
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)

    class FlakyAtFirst:
        refused = 0

        def execute(self, sql: str) -> sqlite3.Cursor:
            if sql.startswith("PRAGMA journal_mode") and self.refused < 2:
                self.refused += 1
                raise sqlite3.OperationalError("database is locked")
            return conn.execute(sql)

    flaky = FlakyAtFirst()
    sqlite_db._wal(flaky)  # type: ignore[arg-type]
    assert flaky.refused == 2
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    class Broken:
        def execute(self, sql: str) -> sqlite3.Cursor:
            raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        sqlite_db._wal(Broken())  # type: ignore[arg-type]
    conn.close()


async def test_decisions_are_inserted_within_an_old_sqlites_parameter_limit(
    tmp_path: Path,
) -> None:
    """The multi-row inserts stay within the library's bound-parameter limit, which SQLite
    builds before 3.32 set at 999 (7 a decision: 142 decisions a statement at most)."""
    store = SqliteStore.open(tmp_path / "s.db")
    await store.close()
    conn = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        conn.execute("BEGIN")
        rows = [scoring._decision_row(decision(i).record) for i in range(1100)]
        decision_writer.insert_decisions(conn, rows)
        conn.execute("COMMIT")
        assert conn.execute("SELECT count(*) FROM decisions").fetchone()[0] == 1100
        assert (
            conn.execute("SELECT count(*) FROM decisions WHERE user_id = 'u'").fetchone()[0] == 1100
        )
    finally:
        conn.close()


async def test_the_decision_log_keeps_only_the_indexes_its_queries_use(tmp_path: Path) -> None:
    """Every index on `decisions` is written at every group commit. (policy, chosen_arm)
    was dropped (ADR 0028): a scan answers server-wide Stats faster than it did; (user_id,
    policy) gained the chosen arm and replaced the `pulls` table (ADR 0030). A file made
    before either loses them when opened."""
    path = tmp_path / "oo-ml.db"
    old = sqlite3.connect(path)
    old.executescript(scoring.MIGRATIONS[0])  # the first schema, which made the index
    old.execute("PRAGMA user_version=1")
    old.close()
    store = SqliteStore.open(path)
    try:
        names = await store.db.read(
            lambda conn: {
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index'"
                    " AND tbl_name = 'decisions' AND name NOT LIKE 'sqlite_autoindex%'"
                )
            }
        )
        assert names == {"decisions_user_arm", "decisions_pending", "decisions_rewarded"}
    finally:
        await store.close()


async def test_pulls_outlive_the_decisions_that_leave_the_log(sqlite_store: SqliteStore) -> None:
    """Pulls are counted from the log plus `pull_offsets` (ADR 0030): pruning and setting
    aside keep a user's pulls, a reset zeroes them though its rewarded decisions stay."""
    store = sqlite_store
    await store.commit([decision(i, arm="ab"[i % 2]) for i in range(1, 9)])
    for i, at in ((1, 100.0), (2, 110.0), (3, 120.0), (4, 130.0)):
        await store.commit([MarkRewarded(f"d{i}", 1.0, at, "explicit")])
    assert await store.pulls("u", "p") == {"a": 4, "b": 4}
    assert await store.prune_decisions(rewarded_before=105.0) == 1  # d1
    assert await store.prune_oldest_rewarded(1) == 1  # d2
    await store.set_aside("d5", "unreadable")
    assert await store.get_decision("d5") is None
    assert await store.pulls("u", "p") == {"a": 4, "b": 4}

    # A reset keeps d3 and d4 (rewarded) but starts the pulls from zero.
    await store.reset_user("u")
    assert await store.get_decision("d3") is not None
    assert await store.pulls("u", "p") == {}
    await store.commit([decision(9, arm="a")])
    assert await store.pulls("u", "p") == {"a": 1}
    # ... and the kept decisions leaving the log later does not bring theirs back.
    assert await store.prune_decisions(rewarded_before=1000.0) == 2
    assert await store.pulls("u", "p") == {"a": 1}


async def test_a_file_with_a_pulls_table_keeps_every_users_pulls(tmp_path: Path) -> None:
    """The migration to `pull_offsets` (ADR 0030) on a file whose `pulls` held more than
    the log (decisions pruned) and less (rewarded decisions a reset kept)."""
    path = tmp_path / "oo-ml.db"
    old = sqlite3.connect(path, isolation_level=None)
    for migration in scoring.MIGRATIONS[:-1]:
        old.executescript(migration)
    old.execute(f"PRAGMA user_version={len(scoring.MIGRATIONS) - 1}")
    logged = [  # (id, user, arm, rewarded at)
        ("u1", "u", "a", None),
        ("u2", "u", "a", 150.0),
        ("u3", "u", "b", None),
        ("v1", "v", "b", 50.0),  # before v's reset
        ("v2", "v", "b", 60.0),  # before v's reset
        ("v3", "v", "b", None),
    ]
    old.executemany(
        "INSERT INTO decisions (decision_id, user_id, policy, created_at, chosen_arm,"
        " reward, rewarded_at, data) VALUES (?, ?, 'p', 1.0, ?, ?, ?, x'00')",
        [(d, u, a, None if at is None else 1.0, at) for d, u, a, at in logged],
    )
    # u: 3 more pulls of a whose decisions were pruned; v: one pull since its reset; w:
    # pulls whose decisions are all gone; x: decisions and no pulls (reset since).
    old.execute(
        "INSERT INTO decisions (decision_id, user_id, policy, created_at, chosen_arm,"
        " reward, rewarded_at, data) VALUES ('x1', 'x', 'p', 1.0, 'a', 1.0, 70.0, x'00')"
    )
    old.executemany(
        "INSERT INTO pulls (user_id, policy, arm, n) VALUES (?, 'p', ?, ?)",
        [("u", "a", 5), ("u", "b", 1), ("v", "b", 1), ("w", "c", 2)],
    )
    old.close()
    store = SqliteStore.open(path)
    try:
        expected = {"u": {"a": 5, "b": 1}, "v": {"b": 1}, "w": {"c": 2}, "x": {}}
        for user, pulls in expected.items():
            assert await store.pulls(user, "p") == pulls, user
        assert await store.prune_decisions(rewarded_before=1000.0) == 4
        for user, pulls in expected.items():
            assert await store.pulls(user, "p") == pulls, user
        # The old table stays for a previous version's writer, and is no longer counted.
        await store.commit([decision(1, arm="a")])
        assert await store.pulls("u", "p") == {"a": 6, "b": 1}
        old_counts = await store.db.read(
            lambda conn: conn.execute("SELECT total(n) FROM pulls").fetchone()[0]
        )
        assert old_counts == 9
    finally:
        await store.close()


async def test_a_writer_on_a_file_not_migrated_yet_still_counts_pulls(tmp_path: Path) -> None:
    """A parent of the previous version, whose writer child starts from an upgraded
    package: on the file it has not migrated, the writer keeps counting in `pulls`, so
    the migration, when it comes, carries every pull over (ADR 0030)."""
    path = tmp_path / "oo-ml.db"
    old = sqlite3.connect(path, isolation_level=None)
    for migration in scoring.MIGRATIONS[:-1]:
        old.executescript(migration)
    old.execute(f"PRAGMA user_version={len(scoring.MIGRATIONS) - 1}")
    old.execute("BEGIN")
    rows = [scoring._decision_row(decision(i, arm="ab"[i % 2]).record) for i in range(5)]
    decision_writer.insert_decisions(old, rows)
    old.execute("COMMIT")
    assert dict(old.execute("SELECT arm, n FROM pulls").fetchall()) == {"a": 3, "b": 2}
    old.close()
    store = SqliteStore.open(path)
    try:
        assert await store.pulls("u", "p") == {"a": 3, "b": 2}
    finally:
        await store.close()

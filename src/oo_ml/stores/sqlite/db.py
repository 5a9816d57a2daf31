"""The embedded store: one SQLite file (WAL) under --data-dir, written by one thread.

Durability guarantee (group commit, ADR 0004): every operation runs on a single writer
thread inside a savepoint of a shared transaction; the thread takes every operation that
is queued, runs them, and commits once with `synchronous=FULL`, so the WAL is fsynced
before any of the batch's callers is resumed. An RPC therefore answers only after its
writes are on disk, and concurrent writes share one fsync. An operation that fails rolls
back its own savepoint only; a failed COMMIT fails the whole batch with
`TransientStoreError` and nothing in it was applied.

`SqliteDB.run` is the generic entry point (ingest adds its own tables through it);
`SqliteStore` implements the engine's `Store` port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from oo_ml.domain.decisions import RewardState
from oo_ml.errors import TransientStoreError
from oo_ml.stores.ports import (
    AddOffPolicy,
    ArmTotals,
    Conflict,
    GenerationRecord,
    InsertDecision,
    MarkRewarded,
    OffPolicyTotals,
    PolicyTotals,
    PromptTotals,
    PutState,
    ReplaceDecisionData,
    StoredDecision,
    StoredState,
    Write,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_BATCH = 512

# Each entry migrates user_version i -> i+1. Append only.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE state (
        user_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        revision INTEGER NOT NULL,
        data BLOB NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (user_id, policy)
    ) WITHOUT ROWID;
    CREATE TABLE decisions (
        decision_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        policy TEXT NOT NULL,
        created_at REAL NOT NULL,
        chosen_arm TEXT NOT NULL,
        prompt_version TEXT NOT NULL DEFAULT '',
        reward REAL,
        rewarded_at REAL,
        reward_source TEXT NOT NULL DEFAULT '',
        data BLOB NOT NULL
    );
    CREATE INDEX decisions_user ON decisions (user_id, policy);
    CREATE INDEX decisions_policy ON decisions (policy, chosen_arm);
    CREATE INDEX decisions_pending ON decisions (created_at) WHERE reward IS NULL;
    CREATE TABLE off_policy (
        served TEXT NOT NULL,
        shadow TEXT NOT NULL,
        n INTEGER NOT NULL DEFAULT 0,
        weight_sum REAL NOT NULL DEFAULT 0,
        weighted_reward_sum REAL NOT NULL DEFAULT 0,
        dr_sum REAL NOT NULL DEFAULT 0,
        dr_sq_sum REAL NOT NULL DEFAULT 0,
        reward_sum REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (served, shadow)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE generations (
        generation_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        prompt_version TEXT NOT NULL,
        model TEXT NOT NULL,
        fallback INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # The prior refresh reads the most recently updated states of a policy.
    "CREATE INDEX state_policy_updated ON state (policy, updated_at);",
]


@dataclass
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    future: Future[Any]


class SqliteDB:
    """One connection, one writer thread, group commit. Use `run` from async code."""

    def __init__(self, path: Path | str, migrations: Sequence[str] = ()) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[_Op | None] = queue.Queue()
        self._reads: queue.Queue[_Op | None] = queue.Queue()
        self._closed = False
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._main,
            args=(list(_MIGRATIONS) + list(migrations),),
            name="oo-sqlite",
            daemon=True,
        )
        self._thread.start()
        self._ready.result()
        # WAL lets a reader run beside the writer: reads never wait behind an fsync. An
        # in-memory database is private to its connection, so there reads share the writer.
        self._reader: threading.Thread | None = None
        if self.path != ":memory:":
            self._reader = threading.Thread(
                target=self._read_main, name="oo-sqlite-read", daemon=True
            )
            self._reader.start()

    def _connect(self, migrations: list[str]) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, which is what makes an answer durable.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for i, script in enumerate(migrations[version:], start=version):
            conn.executescript(f"BEGIN; {script}; PRAGMA user_version={i + 1}; COMMIT;")
        return conn

    def _main(self, migrations: list[str]) -> None:
        try:
            conn = self._connect(migrations)
        except BaseException as e:
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                try:
                    self._run_batch(conn, batch)
                except Exception:  # never let the writer die: every later write would hang
                    log.exception("sqlite writer: unexpected failure")
                if stop:
                    break
        finally:
            conn.close()

    def _read_main(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            while (op := self._reads.get()) is not None:
                # A caller that gave up (deadline, cancel) is skipped, and a running
                # future can no longer be cancelled under us.
                if not op.future.set_running_or_notify_cancel():
                    continue
                try:
                    op.future.set_result(op.fn(conn))
                except Exception as e:
                    op.future.set_exception(e)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        # Operations whose caller gave up before they started are not run at all: a Score
        # cancelled at its deadline leaves no decision behind.
        live = [op for op in batch if op.future.set_running_or_notify_cancel()]
        if not live:
            return
        results: list[tuple[_Op, Any, Exception | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in live:
                conn.execute("SAVEPOINT op")
                try:
                    value = op.fn(conn)
                except Exception as e:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((op, None, e))
                else:
                    conn.execute("RELEASE op")
                    results.append((op, value, None))
            conn.execute("COMMIT")
        except Exception as e:
            # BEGIN, a savepoint or COMMIT failed (full disk, I/O error): nothing of the
            # batch stands, every caller hears so, and the thread goes on.
            log.error("sqlite batch of %d failed: %s", len(live), e)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            failure = TransientStoreError(f"sqlite batch failed: {e}")
            for op in live:
                op.future.set_exception(failure)
            return
        for op, value, err in results:
            if err is not None:
                op.future.set_exception(err)
            else:
                op.future.set_result(value)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) on the writer thread inside a savepoint; return after the commit."""
        if self._closed:
            raise TransientStoreError("store is closed")
        fut: Future[T] = Future()
        self._queue.put(_Op(fn, fut))
        return await asyncio.wrap_future(fut)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only fn(conn) on the reader, which sees every committed write."""
        if self._reader is None:
            return await self.run(fn)
        if self._closed:
            raise TransientStoreError("store is closed")
        fut: Future[T] = Future()
        self._reads.put(_Op(fn, fut))
        return await asyncio.wrap_future(fut)

    async def close(self) -> None:
        """Finish what is queued, then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._reads.put(None)
        await asyncio.to_thread(self._thread.join)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join)


def _apply(conn: sqlite3.Connection, w: Write, revisions: dict[tuple[str, str], int]) -> None:
    match w:
        case PutState(user_id, policy, revision, data):
            if revision == 0:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO state (user_id, policy, revision, data, updated_at)"
                    " VALUES (?, ?, 1, ?, ?)",
                    (user_id, policy, data, time.time()),
                )
            else:
                cur = conn.execute(
                    "UPDATE state SET revision = revision + 1, data = ?, updated_at = ?"
                    " WHERE user_id = ? AND policy = ? AND revision = ?",
                    (data, time.time(), user_id, policy, revision),
                )
            if cur.rowcount != 1:
                raise Conflict(
                    f"state of {user_id!r} under {policy!r} moved past revision {revision}"
                )
            revisions[(user_id, policy)] = revision + 1
        case InsertDecision(
            decision_id, user_id, policy, created_at, chosen_arm, prompt_version, data
        ):
            conn.execute(
                "INSERT INTO decisions (decision_id, user_id, policy, created_at, chosen_arm,"
                " prompt_version, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (decision_id, user_id, policy, created_at, chosen_arm, prompt_version, data),
            )
        case ReplaceDecisionData(decision_id, data):
            conn.execute("UPDATE decisions SET data = ? WHERE decision_id = ?", (data, decision_id))
        case MarkRewarded(decision_id, reward, at, source):
            cur = conn.execute(
                "UPDATE decisions SET reward = ?, rewarded_at = ?, reward_source = ?"
                " WHERE decision_id = ? AND reward IS NULL",
                (reward, at, source, decision_id),
            )
            if cur.rowcount != 1:
                raise Conflict(f"decision {decision_id!r} is already rewarded or gone")
        case AddOffPolicy(served, shadow, weight, reward, dr):
            conn.execute(
                "INSERT INTO off_policy (served, shadow, n, weight_sum, weighted_reward_sum, dr_sum,"
                " dr_sq_sum, reward_sum) VALUES (?, ?, 1, ?, ?, ?, ?, ?)"
                " ON CONFLICT (served, shadow) DO UPDATE SET n = n + 1,"
                " weight_sum = weight_sum + excluded.weight_sum,"
                " weighted_reward_sum = weighted_reward_sum + excluded.weighted_reward_sum,"
                " dr_sum = dr_sum + excluded.dr_sum, dr_sq_sum = dr_sq_sum + excluded.dr_sq_sum,"
                " reward_sum = reward_sum + excluded.reward_sum",
                (served, shadow, weight, weight * reward, dr, dr * dr, reward),
            )


class SqliteStore:
    """The engine's `Store` on a `SqliteDB`."""

    def __init__(self, db: SqliteDB) -> None:
        self.db = db

    @classmethod
    def open(cls, path: Path | str) -> SqliteStore:
        return cls(SqliteDB(path))

    async def get(self, user_id: str, policy: str) -> StoredState | None:
        def q(conn: sqlite3.Connection) -> StoredState | None:
            row = conn.execute(
                "SELECT revision, data FROM state WHERE user_id = ? AND policy = ?",
                (user_id, policy),
            ).fetchone()
            return StoredState(row[0], row[1]) if row else None

        return await self.db.read(q)

    async def compare_and_set(
        self, user_id: str, policy: str, revision: int, data: bytes
    ) -> int | None:
        try:
            revs = await self.commit([PutState(user_id, policy, revision, data)])
        except Conflict:
            return None
        return revs[(user_id, policy)]

    async def commit(self, writes: Sequence[Write]) -> dict[tuple[str, str], int]:
        def tx(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            revisions: dict[tuple[str, str], int] = {}
            for w in writes:
                _apply(conn, w, revisions)
            return revisions

        return await self.db.run(tx)

    async def get_decision(self, decision_id: str) -> StoredDecision | None:
        def q(conn: sqlite3.Connection) -> StoredDecision | None:
            row = conn.execute(
                "SELECT data, reward, rewarded_at, reward_source FROM decisions WHERE decision_id = ?",
                (decision_id,),
            ).fetchone()
            return StoredDecision(row[0], RewardState(row[1], row[2], row[3])) if row else None

        return await self.db.read(q)

    async def pending_before(self, cutoff: float, limit: int) -> list[str]:
        def q(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT decision_id FROM decisions WHERE reward IS NULL AND created_at < ?"
                " ORDER BY created_at LIMIT ?",
                (cutoff, limit),
            ).fetchall()
            return [r[0] for r in rows]

        return await self.db.read(q)

    async def reset_user(self, user_id: str) -> tuple[int, int]:
        def tx(conn: sqlite3.Connection) -> tuple[int, int]:
            states = conn.execute("DELETE FROM state WHERE user_id = ?", (user_id,)).rowcount
            pending = conn.execute(
                "DELETE FROM decisions WHERE user_id = ? AND reward IS NULL", (user_id,)
            ).rowcount
            return states, pending

        return await self.db.run(tx)

    async def policy_states(self, policy: str, limit: int) -> list[bytes]:
        def q(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT data FROM state WHERE policy = ? ORDER BY updated_at DESC LIMIT ?",
                (policy, limit),
            ).fetchall()
            return [r[0] for r in rows]

        return await self.db.read(q)

    async def policy_totals(self, policy: str) -> PolicyTotals:
        def q(conn: sqlite3.Connection) -> PolicyTotals:
            arms = [
                ArmTotals(r[0], r[1], r[2], r[3] or 0.0)
                for r in conn.execute(
                    "SELECT chosen_arm, count(*), count(reward), total(reward) FROM decisions"
                    " WHERE policy = ? GROUP BY chosen_arm ORDER BY chosen_arm",
                    (policy,),
                )
            ]
            users, pending = conn.execute(
                "SELECT count(DISTINCT user_id), count(*) - count(reward) FROM decisions WHERE policy = ?",
                (policy,),
            ).fetchone()
            return PolicyTotals(arms=arms, users=users or 0, pending=pending or 0)

        return await self.db.read(q)

    async def prompt_totals(self, policy: str, user_id: str | None) -> list[PromptTotals]:
        def q(conn: sqlite3.Connection) -> list[PromptTotals]:
            sql = (
                "SELECT prompt_version, count(*), count(reward), total(reward) FROM decisions"
                " WHERE policy = ? AND prompt_version != ''"
            )
            args: tuple[str, ...] = (policy,)
            if user_id is not None:
                sql += " AND user_id = ?"
                args = (policy, user_id)
            sql += " GROUP BY prompt_version ORDER BY prompt_version"
            return [PromptTotals(r[0], r[1], r[2], r[3]) for r in conn.execute(sql, args)]

        return await self.db.read(q)

    async def off_policy_totals(self, served: str) -> list[OffPolicyTotals]:
        def q(conn: sqlite3.Connection) -> list[OffPolicyTotals]:
            return [
                OffPolicyTotals(*r)
                for r in conn.execute(
                    "SELECT shadow, n, weight_sum, weighted_reward_sum, dr_sum, dr_sq_sum, reward_sum"
                    " FROM off_policy WHERE served = ? ORDER BY shadow",
                    (served,),
                )
            ]

        return await self.db.read(q)

    async def pending_count(self, user_id: str, policy: str) -> int:
        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count(*) FROM decisions WHERE user_id = ? AND policy = ? AND reward IS NULL",
                (user_id, policy),
            ).fetchone()
            return int(row[0])

        return await self.db.read(q)

    async def prune_decisions(self, rewarded_before: float) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            n = conn.execute(
                "DELETE FROM decisions WHERE reward IS NOT NULL AND rewarded_at < ?",
                (rewarded_before,),
            ).rowcount
            conn.execute("DELETE FROM generations WHERE created_at < ?", (rewarded_before,))
            return n

        return await self.db.run(tx)

    async def record_generation(self, g: GenerationRecord) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO generations (generation_id, user_id, prompt_version, model,"
                " fallback, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    g.generation_id,
                    g.user_id,
                    g.prompt_version,
                    g.model,
                    int(g.fallback),
                    g.created_at,
                ),
            )

        await self.db.run(tx)

    async def generations(self, ids: Sequence[str]) -> dict[str, GenerationRecord]:
        def q(conn: sqlite3.Connection) -> dict[str, GenerationRecord]:
            marks = ",".join("?" * len(ids))
            rows = conn.execute(
                "SELECT generation_id, user_id, prompt_version, model, fallback, created_at"
                f" FROM generations WHERE generation_id IN ({marks})",
                tuple(ids),
            )
            return {r[0]: GenerationRecord(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows}

        return await self.db.read(q) if ids else {}

    async def close(self) -> None:
        await self.db.close()

"""The SQLite executor: one file (WAL), one writer thread with group commit, one reader.

Durability guarantee (group commit, ADR 0004): every operation runs on a single writer
thread inside a savepoint of a shared transaction; the thread takes every operation that
is queued, runs them, and commits once with `synchronous=FULL`, so the WAL is fsynced
before any of the batch's callers is resumed. An RPC therefore answers only after its
writes are on disk, and concurrent writes share one fsync. An operation that fails rolls
back its own savepoint only; a failed COMMIT fails the whole batch with
`TransientStoreError` and nothing in it was applied.

`SqliteDB.run` runs a function in the writer's transaction; `SqliteDB.read` on the WAL
reader, which never waits behind a commit's fsync. An `sqlite3.OperationalError` (a locked
or full database) is raised to callers as `TransientStoreError`: the ports speak of what a
caller can do (retry), not of SQLite. The tables are the business of `scoring` and
`profiles`, which bring their own migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from oo_ml.errors import TransientStoreError

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_BATCH = 512
# How long an opener waits for another process's migration (workers starting at once).
MIGRATION_LOCK_WAIT_MS = 300_000
# Reads answered together: enough to share a wake-up under load, few enough that the
# first of them does not wait long for the others.
_MAX_READS = 16


@dataclass
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    # The caller's own asyncio future, settled on its loop (`_deliver`). Not a
    # concurrent.futures.Future chained to one (`asyncio.wrap_future`): that costs a second
    # future, its callbacks and a loop wake-up per operation, where a batch needs one.
    future: asyncio.Future[Any]
    # Runs on its own, outside the batch's transaction (a WAL checkpoint cannot run in one).
    alone: bool = False


# What a thread hands back: each operation's future with its value or its error.
_Outcome = tuple["asyncio.Future[Any]", Any, "BaseException | None"]


def _settle(outcomes: list[_Outcome]) -> None:
    """On the callers' loop: resolve every future whose caller still waits. One that
    cannot be resolved must not leave the others of its batch waiting for ever."""
    for future, value, error in outcomes:
        if future.done():  # the caller gave up (cancelled at a deadline)
            continue
        try:
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
        except Exception as e:
            log.exception("sqlite: an answer could not be delivered")
            future.set_exception(TransientStoreError(f"sqlite: undeliverable answer: {e}"))


def _take(q: queue.Queue[_Op | None], limit: int) -> tuple[list[_Op], bool]:
    """The next operation and those queued behind it (up to `limit`), and whether the
    stop marker came."""
    first = q.get()
    if first is None:
        return [], True
    batch = [first]
    while len(batch) < limit:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return batch, True
        batch.append(nxt)
    return batch, False


def _error(e: Exception) -> Exception:
    # A future cannot hold a StopIteration (it would end the awaiting coroutine instead).
    if isinstance(e, StopIteration | StopAsyncIteration):
        return RuntimeError(f"store operation raised {type(e).__name__}")
    return e


def _call(op: _Op, conn: sqlite3.Connection) -> _Outcome:
    try:
        return (op.future, op.fn(conn), None)
    except Exception as e:
        return (op.future, None, _error(e))


def _deliver(outcomes: list[_Outcome]) -> None:
    """From a SQLite thread: one loop wake-up for a whole batch's outcomes."""
    loops: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        loops.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, mine in loops.items():
        with contextlib.suppress(RuntimeError):  # that loop closed meanwhile
            loop.call_soon_threadsafe(_settle, mine)


def _unanswered(batch: Sequence[_Op], outcomes: list[_Outcome], why: str) -> list[_Outcome]:
    """Outcomes for the operations of `batch` that have none: an error, so that no
    caller waits for ever when the thread fails in a way it did not plan for."""
    if len(outcomes) == len(batch):  # the usual case: every operation was answered
        return []
    answered = {id(o[0]) for o in outcomes}
    failure = TransientStoreError(why)
    return [(op.future, None, failure) for op in batch if id(op.future) not in answered]


class SqliteDB:
    """One connection, one writer thread, group commit. Use `run` from async code."""

    def __init__(self, path: Path | str, migrations: Sequence[str] = ()) -> None:
        self.path = str(path)
        # Who wrote a row of the change sequence (`changes`): processes sharing the file
        # follow the others' writes and skip their own, which their caches already hold.
        self.origin = int.from_bytes(os.urandom(7), "big")
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[_Op | None] = queue.Queue()
        self._reads: queue.Queue[_Op | None] = queue.Queue()
        self._closed = False
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._main,
            args=(list(migrations),),
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
        # First, so that processes opening the file at once wait for each other.
        conn.execute("PRAGMA busy_timeout=5000")
        _wal(conn)
        # FULL: the WAL is fsynced at every commit, which is what makes an answer durable.
        conn.execute("PRAGMA synchronous=FULL")
        # Under the write lock, version read included: processes opening a new file at
        # once (the workers of `oo-ml serve --workers N`) migrate it one after the other,
        # and the later ones find it done. Statement by statement, as executescript()
        # would commit first. (No migration has a ';' inside a literal.)
        # A migration can hold the lock for seconds (ADR 0030's took 2.2 s for a million
        # decisions): the other openers wait for it rather than fail after 5 s.
        conn.execute(f"PRAGMA busy_timeout={MIGRATION_LOCK_WAIT_MS}")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for script in migrations[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version < len(migrations):
                conn.execute(f"PRAGMA user_version={len(migrations)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return conn

    def _main(self, migrations: list[str]) -> None:
        try:
            conn = self._connect(migrations)
        except BaseException as e:
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        try:
            stop = False
            while not stop:
                batch, stop = _take(self._queue, _MAX_BATCH)
                if not batch:
                    continue
                try:
                    self._run_batch(conn, batch)
                except Exception:  # never let the writer die: every later write would hang
                    log.exception("sqlite writer: unexpected failure")
        finally:
            conn.close()

    def _read_main(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            stop = False
            while not stop:
                # Every read queued meanwhile too, answered with one wake-up.
                batch, stop = _take(self._reads, _MAX_READS)
                outcomes: list[_Outcome] = []
                try:
                    for op in batch:
                        # A caller that gave up (deadline, cancel) is skipped.
                        if not op.future.cancelled():
                            outcomes.append(_call(op, conn))
                finally:
                    outcomes += _unanswered(batch, outcomes, "sqlite reader failed")
                    _deliver(outcomes)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        # Operations whose caller gave up before they started are not run at all: a Score
        # cancelled at its deadline leaves no decision behind.
        outcomes: list[_Outcome] = []
        try:
            for op in batch:
                if op.alone and not op.future.cancelled():
                    outcomes.append(_call(op, conn))
            live = [op for op in batch if not op.alone]
            if live:
                outcomes += self._transaction(conn, live)
        finally:
            # The callers hear after the COMMIT (its fsync), all with one wake-up; an
            # operation skipped because its caller gave up gets an answer nobody reads.
            outcomes += _unanswered(batch, outcomes, "sqlite writer failed")
            _deliver(outcomes)

    def _transaction(self, conn: sqlite3.Connection, live: list[_Op]) -> list[_Outcome]:
        results: list[_Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in live:
                if op.future.cancelled():  # checked again: earlier ones took time
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    value = op.fn(conn)
                except Exception as e:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((op.future, None, _error(e)))
                else:
                    conn.execute("RELEASE op")
                    results.append((op.future, value, None))
            conn.execute("COMMIT")
        except Exception as e:
            # BEGIN, a savepoint or COMMIT failed (full disk, I/O error): nothing of the
            # batch stands, every caller hears so, and the thread goes on.
            log.error("sqlite batch of %d failed: %s", len(live), e)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            failure = TransientStoreError(f"sqlite batch failed: {e}")
            results = [(op.future, None, failure) for op in live]
        return results

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(conn) on the writer thread inside a savepoint; return after the commit."""
        if self._closed:
            raise TransientStoreError("store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op(fn, fut))
        try:
            return await fut
        except sqlite3.OperationalError as e:
            raise TransientStoreError(f"sqlite: {e}") from e

    async def checkpoint(self) -> tuple[int, int]:
        """Checkpoint the WAL into the database and truncate it, between two batches (so
        it waits for no commit); (WAL pages, pages checkpointed). Under a steady load the
        automatic checkpoints can fall behind the readers, and the WAL only grows."""
        if self._closed:
            raise TransientStoreError("store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, int]] = loop.create_future()

        def truncate(conn: sqlite3.Connection) -> tuple[int, int]:
            _busy, pages, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return int(pages), int(done)

        self._queue.put(_Op(truncate, fut, alone=True))
        try:
            return await fut
        except sqlite3.OperationalError as e:
            raise TransientStoreError(f"sqlite checkpoint: {e}") from e

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only fn(conn) on the reader, which sees every committed write."""
        if self._reader is None:
            return await self.run(fn)
        if self._closed:
            raise TransientStoreError("store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._reads.put(_Op(fn, fut))
        try:
            return await fut
        except sqlite3.OperationalError as e:
            raise TransientStoreError(f"sqlite: {e}") from e

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


_WAL_WITHIN_S = 30.0


def _wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode. Switching takes an exclusive lock, and SQLite answers
    "database is locked" at once, without the busy handler, when another connection
    (another worker opening the same new file) holds a lock meanwhile: retried briefly."""
    deadline = time.monotonic() + _WAL_WITHIN_S
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)

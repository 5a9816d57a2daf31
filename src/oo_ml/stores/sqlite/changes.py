"""The change sequence of a SQLite file, and the `ChangeFeed` that follows it (ADR 0020).

Several processes may share one SQLite file (`oo-ml serve --workers N`, `oo-ml migrate`
beside a running server), and each keeps models and profile features in memory. So every
write of cached state appends a row to `changes` in the same transaction:

    PutState        (user, policy, revision after the write)
    reset_user      (user, EVERY_POLICY, 0)
    ingest's batch  (user, PROFILE, 0) once per user whose profile or tasks it touched

`seq` is AUTOINCREMENT, so a number is never handed out twice, even after the rows that
held the largest ones were pruned: a follower that remembers "seen up to 1234" can never
mistake a new row for one it saw. `origin` is the writing `SqliteDB`'s random id, so a
follower skips its own writes (its caches took them already, by write-through).

`SqliteChangeFeed.follow` has a child process (`change_probe`) look at the head of the
sequence every `POLL_S` (a few µs on a connection of its own) and, when another origin's
rows arrived, reads `WHERE seq > last` on the store's reader thread (which never waits
behind a commit), handing each batch to `apply`.
The table is read every `FULL_READ_S` anyway, whatever the probe says. `prune`, run by
upkeep, deletes rows older than about `RETENTION_S` and records the highest seq deleted in
`change_horizon`; a follower whose `last` is below it lost rows it never saw (it was
frozen longer than the retention) and reports an `EVERY_USER` change: drop every cache.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from oo_ml.domain.ports import EVERY_POLICY, EVERY_USER, Change
from oo_ml.errors import TransientStoreError
from oo_ml.stores.sqlite import decision_writer as dw
from oo_ml.stores.sqlite.change_probe import ProbeProcess
from oo_ml.stores.sqlite.db import SqliteDB

log = logging.getLogger(__name__)
T = TypeVar("T")

# Both migration lists (the scoring tables' and the ingest's) run this, so either store
# alone on a file finds the table; frozen, like any migration.
SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    policy TEXT NOT NULL,
    revision INTEGER NOT NULL,
    origin INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS change_horizon (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    pruned_through INTEGER NOT NULL
);
INSERT OR IGNORE INTO change_horizon (id, pruned_through) VALUES (0, 0)
"""

POLL_S = 0.010
"""How often a follower looks for new rows: a model another worker changed is served
at most this much (plus a reader hop) older than the store's."""
FULL_READ_S = 1.0
"""The table is read at least this often, whatever the probe says."""
RETENTION_S = 60.0
"""How long rows are kept: a follower frozen for longer starts over (EVERY_USER)."""
PRUNE_EVERY_S = 15.0
"""Upkeep's interval for `prune`."""
_BATCH = 1000
_ERROR_LOG_EVERY_S = 30.0


def note(conn: sqlite3.Connection, origin: int, user_id: str, policy: str, revision: int) -> None:
    """Append one change; call it inside the transaction of the write it announces."""
    # The statement lives with the writer process's, which appends the changes of the
    # states it stores (it imports nothing of oo_ml).
    dw.note_change(conn, origin, user_id, policy, revision)


def note_each(conn: sqlite3.Connection, origin: int, keys: Iterable[tuple[str, str]]) -> None:
    """Append a revision-less change per (user, policy), in the caller's transaction."""
    conn.executemany(
        "INSERT INTO changes (user_id, policy, revision, origin) VALUES (?, ?, 0, ?)",
        [(u, p, origin) for u, p in keys],
    )


def _read(conn: sqlite3.Connection, after: int) -> tuple[int, list[tuple[int, str, str, int, int]]]:
    horizon = conn.execute("SELECT pruned_through FROM change_horizon WHERE id = 0").fetchone()
    rows = conn.execute(
        "SELECT seq, user_id, policy, revision, origin FROM changes WHERE seq > ?"
        " ORDER BY seq LIMIT ?",
        (after, _BATCH),
    ).fetchall()
    return (int(horizon[0]) if horizon else 0), rows


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(seq) FROM changes").fetchone()
    horizon = conn.execute("SELECT pruned_through FROM change_horizon WHERE id = 0").fetchone()
    return max(int(row[0] or 0), int(horizon[0]) if horizon else 0)


class SqliteChangeFeed:
    """The `ChangeFeed` port over one SQLite file's `changes` table."""

    def __init__(
        self,
        db: SqliteDB,
        *,
        poll_s: float = POLL_S,
        retention_s: float = RETENTION_S,
        full_read_s: float = FULL_READ_S,
    ) -> None:
        self.db = db
        self.poll_s = poll_s
        self.full_read_s = full_read_s
        self.retention_s = retention_s
        self.seen = 0
        """Changes by other writers handed to `apply` (our own are skipped)."""
        self.lost_track = 0
        """Times the feed fell behind a prune and reported EVERY_USER."""
        self.failures = 0
        """Polls that failed (the store locked or away); retried."""
        self.last = 0
        """The highest seq seen."""
        self._positioned = False
        # (monotonic time, highest seq then): what `prune` may delete once it is old.
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._last_error_log = -1e9
        self.probe: ProbeProcess | None = None
        """The child that watches the head while `follow` runs (none for ":memory:")."""

    async def follow(self, apply: Callable[[Sequence[Change]], None], stop: asyncio.Event) -> None:
        """Hand every change other writers make to `apply`, until `stop`: from
        `catch_up()` on if it was called, else from now."""
        if not self._positioned:
            start = await self._retry(lambda: self.db.read(_last_seq), stop)
            if start is None:
                return
            self.last, self._positioned = start, True
        wake = asyncio.Event()
        probe = None
        if self.db.path != ":memory:":  # private to its connection: nobody else writes it
            probe = ProbeProcess(
                self.db.path, self.poll_s, self.db.origin, wake.set, lambda: self.last
            )
            probe.start()
        self.probe = probe
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if not await self._poll(apply, stop):
                    return
                # Until the probe sees a new row (or a prune), or FULL_READ_S passes.
                woken = asyncio.create_task(wake.wait())
                await asyncio.wait(
                    {woken, stopping},
                    timeout=self.full_read_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                woken.cancel()
                wake.clear()  # before the read: a row committed after it wakes us again
        finally:
            stopping.cancel()
            if probe is not None:
                await probe.stop()

    async def _poll(self, apply: Callable[[Sequence[Change]], None], stop: asyncio.Event) -> bool:
        """Read and apply what is new, all of it; False when stopped meanwhile."""
        while True:
            got = await self._retry(lambda: self.db.read(lambda c: _read(c, self.last)), stop)
            if got is None:
                return False
            horizon, rows = got
            changes: list[Change] = []
            if horizon > self.last:
                # Rows we never saw were pruned: any cache entry may be stale.
                self.lost_track += 1
                log.warning(
                    "change feed fell behind the prune (seen up to %d, pruned through %d):"
                    " dropping every cached model and profile",
                    self.last,
                    horizon,
                )
                changes.append(Change(EVERY_USER, EVERY_POLICY, 0))
                self.last = horizon
            origin = self.db.origin
            for seq, user_id, policy, revision, row_origin in rows:
                if seq > self.last:
                    self.last = seq
                    if row_origin != origin:
                        changes.append(Change(user_id, policy, revision))
            if changes:
                self.seen += len(changes)
                apply(changes)
            if len(rows) < _BATCH:
                return True

    async def catch_up(self) -> None:
        """Start following from the end of the sequence as it is now. Call it before
        anything is cached: a change committed between a cache read and the start of
        `follow` would otherwise never be seen."""
        self.last = await self.db.read(_last_seq)
        self._positioned = True

    async def _retry(self, read: Callable[[], Awaitable[T]], stop: asyncio.Event) -> T | None:
        """`read()`, again after a pause while the store fails (locked, away); None once
        `stop` is set. Nothing is lost meanwhile: the rows wait in the table."""
        pause = self.poll_s
        while not stop.is_set():
            try:
                return await read()
            except TransientStoreError as e:
                self.failures += 1
                now = time.monotonic()
                if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
                    self._last_error_log = now
                    log.warning("change feed cannot read the store (retrying): %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            pause = min(pause * 2, 1.0)
        return None

    async def prune(self) -> int:
        """Delete the rows older than the retention (upkeep calls this every
        `PRUNE_EVERY_S`); returns how many went."""
        now = time.monotonic()
        self._marks.append((now, await self.db.read(_last_seq)))
        cutoff = 0
        while self._marks and now - self._marks[0][0] >= self.retention_s:
            cutoff = self._marks.popleft()[1]
        if cutoff == 0:
            return 0

        def tx(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM changes WHERE seq <= ?", (cutoff,)).rowcount
            conn.execute(
                "UPDATE change_horizon SET pruned_through = max(pruned_through, ?) WHERE id = 0",
                (cutoff,),
            )
            return int(n)

        return await self.db.run(tx)

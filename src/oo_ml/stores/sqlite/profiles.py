"""The ingest's SQLite tables, and the FeatureStore and TaskSource the engine reads from them.

Tables (in the engine's SQLite file, written through `SqliteDB.run` by `profile_writes`,
so each batch of events lands in one durable transaction):

    ingest_applied          event_id -> applied_at: the dedupe table, pruned past the window;
                            applied_at is the later of the apply time and occurred_at, so a
                            producer clock ahead of ours cannot outlive its id's memory
    ingest_served           decision_id of each TipServed counted, so a decision served once
                            counts once even if two producers report it
    ingest_daily            per user, per UTC day: served, feedback by action, views, dwell
                            sum, and the time of the last contributing event of each
    ingest_completed_hours  per user, per UTC day, per hour: completed tips
    ingest_task_syncs       per user and provider: time of the snapshot in force
    ingest_tasks            the snapshot's tasks
    ingest_integration_events / ingest_integrations   the integration log and current state

Profile features are sums over the 30 daily buckets ending today (UTC), so they move
incrementally as events arrive and as days leave the window, without rescanning events.
SQL sums the window; `profile_model` (shared with the NATS store) turns the sums into
features: one with no data in the window is left out, so the contract's fallback applies;
a present feature's `updated_at` is the time of its last contributing event, so the
contract's TTL applies too. Hours are UTC: no event carries the user's time zone yet.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from oo_ml.domain.contracts import Contracts
from oo_ml.domain.events import Event
from oo_ml.domain.features import StoredValue, TaskView
from oo_ml.domain.ports import PROFILE
from oo_ml.stores.profile_model import (
    DAY_S,
    TOTALS,
    WINDOW_DAYS,
    CachedFeatures,
    Day,
    TaskCounts,
    day_of,
    first_window_day,
    profile_features,
    task_ttl,
    valid_until,
)
from oo_ml.stores.sqlite import changes
from oo_ml.stores.sqlite.db import SqliteDB
from oo_ml.stores.sqlite.profile_writes import applied_among, plan_batch, record_events

T = TypeVar("T")

# Each entry moves the ingest schema from version i to i + 1. Append only.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE ingest_applied (
        event_id TEXT PRIMARY KEY,
        applied_at REAL NOT NULL,
        kind TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX ingest_applied_at ON ingest_applied (applied_at);
    CREATE TABLE ingest_served (
        decision_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        recorded_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX ingest_served_at ON ingest_served (recorded_at);
    CREATE TABLE ingest_daily (
        user_id TEXT NOT NULL,
        day INTEGER NOT NULL,
        served INTEGER NOT NULL DEFAULT 0,
        last_served_at REAL NOT NULL DEFAULT 0,
        feedback INTEGER NOT NULL DEFAULT 0,
        completed INTEGER NOT NULL DEFAULT 0,
        dismissed INTEGER NOT NULL DEFAULT 0,
        snoozed INTEGER NOT NULL DEFAULT 0,
        last_feedback_at REAL NOT NULL DEFAULT 0,
        last_completed_at REAL NOT NULL DEFAULT 0,
        views INTEGER NOT NULL DEFAULT 0,
        dwell_ms_sum REAL NOT NULL DEFAULT 0,
        last_view_at REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (user_id, day)
    ) WITHOUT ROWID;
    CREATE TABLE ingest_completed_hours (
        user_id TEXT NOT NULL,
        day INTEGER NOT NULL,
        hour INTEGER NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (user_id, day, hour)
    ) WITHOUT ROWID;
    CREATE TABLE ingest_task_syncs (
        user_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        synced_at REAL NOT NULL,
        PRIMARY KEY (user_id, provider)
    ) WITHOUT ROWID;
    CREATE TABLE ingest_tasks (
        user_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        task_id TEXT NOT NULL,
        title TEXT NOT NULL,
        due_at REAL,
        priority INTEGER NOT NULL,
        completed INTEGER NOT NULL,
        PRIMARY KEY (user_id, provider, task_id)
    ) WITHOUT ROWID;
    CREATE TABLE ingest_integration_events (
        event_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        change TEXT NOT NULL,
        occurred_at REAL NOT NULL,
        detail TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        retryable INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX ingest_integration_events_at ON ingest_integration_events (occurred_at);
    CREATE TABLE ingest_integrations (
        user_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        status TEXT NOT NULL,
        updated_at REAL NOT NULL,
        detail TEXT NOT NULL,
        failures INTEGER NOT NULL,
        PRIMARY KEY (user_id, provider)
    ) WITHOUT ROWID;
    """,
    # The change sequence (ADR 0020): each batch notes the users whose profile it changed,
    # so the other processes on this file drop their cached features.
    changes.SCHEMA,
]


def _migrate(conn: sqlite3.Connection) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS ingest_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
    )
    row = conn.execute("SELECT value FROM ingest_meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row else 0
    for script in _MIGRATIONS[version:]:
        # executescript would COMMIT the writer's shared transaction; run statement by statement.
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute(
        "INSERT INTO ingest_meta (key, value) VALUES ('schema_version', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (len(_MIGRATIONS),),
    )
    return len(_MIGRATIONS)


def _stored_features(conn: sqlite3.Connection, user_id: str, now: float) -> dict[str, StoredValue]:
    today = day_of(now)
    first = first_window_day(now)
    row = conn.execute(
        "SELECT total(served), max(last_served_at), total(feedback), total(completed),"
        " total(dismissed), total(snoozed), max(last_feedback_at), max(last_completed_at),"
        " total(views), total(dwell_ms_sum), max(last_view_at)"
        " FROM ingest_daily WHERE user_id = ? AND day BETWEEN ? AND ?",
        (user_id, first, today),
    ).fetchone()
    sums = Day.of_row([v or 0.0 for v in row])  # max() of no rows is NULL
    hour = conn.execute(
        "SELECT hour FROM ingest_completed_hours WHERE user_id = ? AND day BETWEEN ? AND ?"
        " GROUP BY hour ORDER BY sum(n) DESC, hour LIMIT 1",
        (user_id, first, today),
    ).fetchone()
    synced = conn.execute(
        "SELECT max(synced_at) FROM ingest_task_syncs WHERE user_id = ?", (user_id,)
    ).fetchone()[0]
    tasks = None
    if synced is not None:
        open_, overdue = conn.execute(
            "SELECT count(*), total(due_at IS NOT NULL AND due_at < ?) FROM ingest_tasks"
            " WHERE user_id = ? AND completed = 0",
            (now, user_id),
        ).fetchone()
        tasks = TaskCounts(synced, int(open_), int(overdue))
    return profile_features(sums, None if hour is None else int(hour[0]), tasks)


def _features_until(
    conn: sqlite3.Connection, user_id: str, now: float
) -> tuple[dict[str, StoredValue], float]:
    """The features at `now`, and until when they hold without a new event."""
    due = conn.execute(
        "SELECT min(due_at) FROM ingest_tasks WHERE user_id = ? AND completed = 0 AND due_at >= ?",
        (user_id, now),
    ).fetchone()[0]
    return _stored_features(conn, user_id, now), valid_until(now, due)


class SqliteProfileStore(CachedFeatures):
    """The `ProfileStore` port over the ingest tables: FeatureStore and TaskSource for Score
    and Generate, and the batch writes of ingest's `effects`."""

    def __init__(
        self,
        db: SqliteDB,
        dedupe_window_s: float,
        contracts: Contracts,
        *,
        cache_s: float = 30.0,
        cache_users: int = 100_000,
    ) -> None:
        # The hot path reads a user's features from memory (`CachedFeatures`): entries live
        # `cache_s` at most, and the batches this process records drop their users' entries.
        super().__init__(cache_s, cache_users)
        self.db = db
        self.dedupe_window_s = dedupe_window_s
        self._task_ttl_s = task_ttl(contracts)
        self._ready = False

    async def ensure_schema(self) -> None:
        if not self._ready:
            await self.db.run(_migrate)
            self._ready = True

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # The store's WAL reader: Score's feature reads never queue behind an ingest commit.
        await self.ensure_schema()
        return await self.db.read(fn)

    # -- FeatureStore / TaskSource ----------------------------------------------------------

    async def _load_features(
        self, user_id: str, now: float
    ) -> tuple[dict[str, StoredValue], float]:
        return await self._read(lambda conn: _features_until(conn, user_id, now))

    async def open_tasks(self, user_id: str, now: float, limit: int) -> list[TaskView]:
        """Open tasks, overdue first, then by due time and priority. Empty when the last
        snapshot is older than the open_tasks contract's TTL: stale tasks mislead a prompt."""
        ttl = self._task_ttl_s

        def q(conn: sqlite3.Connection) -> list[TaskView]:
            synced = conn.execute(
                "SELECT max(synced_at) FROM ingest_task_syncs WHERE user_id = ?", (user_id,)
            ).fetchone()[0]
            if synced is None or (ttl and now - synced > ttl):
                return []
            rows = conn.execute(
                "SELECT title, due_at, priority FROM ingest_tasks WHERE user_id = ? AND completed = 0"
                " ORDER BY (due_at IS NOT NULL AND due_at < ?) DESC, due_at IS NULL, due_at,"
                " priority DESC, task_id LIMIT ?",
                (user_id, now, limit),
            ).fetchall()
            return [
                TaskView(title, due, int(prio), due is not None and due < now)
                for title, due, prio in rows
            ]

        return await self._read(q)

    # -- writes ---------------------------------------------------------------------------

    async def applied_among(self, event_ids: Sequence[str]) -> set[str]:
        await self.ensure_schema()
        return await self.db.run(lambda conn: applied_among(conn, event_ids))

    async def record(self, events: Sequence[Event], now: float) -> list[bool]:
        """`record_events` in one durable transaction. The features of the batch's users
        that Score has in memory are read again in that transaction and replace the cached
        ones: each TipServed oo-ml publishes comes back here, and dropping the entry
        instead would send that user's next Score to the store."""
        await self.ensure_schema()
        plan = plan_batch(events, now)
        origin = self.db.origin
        touched = {e.user_id for e in events}
        hot = self.hot_users(touched)
        started = time.monotonic()

        def tx(
            conn: sqlite3.Connection,
        ) -> tuple[list[bool], dict[str, tuple[dict[str, StoredValue], float]]]:
            fresh = record_events(conn, events, now, plan)
            # One change per user whose rows moved, in the same transaction (ADR 0020).
            users = sorted({e.user_id for e, f in zip(events, fresh, strict=True) if f})
            changes.note_each(conn, origin, ((u, PROFILE) for u in users))
            return fresh, {u: _features_until(conn, u, now) for u in users if u in hot}

        try:
            applied, refreshed = await self.db.run(tx)
        except BaseException:
            # Even a failed commit may have been applied (a lost answer): forget, re-read.
            self._invalidate(touched)
            raise
        self._replace(touched, refreshed, started)
        return applied

    async def prune(self, now: float) -> int:
        """Forget event ids past the dedupe window and buckets past the 30-day window.
        Returns how many event ids were forgotten."""
        await self.ensure_schema()
        cutoff = now - self.dedupe_window_s
        oldest_day = first_window_day(now)

        def tx(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM ingest_applied WHERE applied_at < ?", (cutoff,)).rowcount
            conn.execute("DELETE FROM ingest_served WHERE recorded_at < ?", (cutoff,))
            conn.execute("DELETE FROM ingest_daily WHERE day < ?", (oldest_day,))
            conn.execute("DELETE FROM ingest_completed_hours WHERE day < ?", (oldest_day,))
            conn.execute(
                "DELETE FROM ingest_integration_events WHERE occurred_at < ?",
                (now - WINDOW_DAYS * DAY_S,),
            )
            return n

        return await self.db.run(tx)

    # -- inspection (tests, operators) ----------------------------------------------------

    async def totals(self, user_id: str | None = None) -> dict[str, float]:
        """All-time sums of the daily counters still kept, and the applied-event count."""
        await self.ensure_schema()

        def q(conn: sqlite3.Connection) -> dict[str, float]:
            where, args = ("WHERE user_id = ?", (user_id,)) if user_id is not None else ("", ())
            row = conn.execute(
                "SELECT total(served), total(feedback), total(completed), total(dismissed),"
                f" total(snoozed), total(views), total(dwell_ms_sum) FROM ingest_daily {where}",
                args,
            ).fetchone()
            out = dict(zip(TOTALS, (float(v) for v in row), strict=True))
            out["applied_events"] = float(
                conn.execute("SELECT count(*) FROM ingest_applied").fetchone()[0]
            )
            return out

        return await self.db.run(q)

    async def integration_status(self, user_id: str, provider: str) -> tuple[str, int] | None:
        await self.ensure_schema()

        def q(conn: sqlite3.Connection) -> tuple[str, int] | None:
            row = conn.execute(
                "SELECT status, failures FROM ingest_integrations"
                " WHERE user_id = ? AND provider = ?",
                (user_id, provider),
            ).fetchone()
            return (str(row[0]), int(row[1])) if row else None

        return await self.db.run(q)

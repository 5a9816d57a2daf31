"""The ingest's writes: a batch of events -> rows of the profile tables, in one transaction.

`plan_batch` aggregates a batch (per user and UTC day, per hour for completions) without
touching the database, on the event loop; `record_events` runs on SQLite's writer thread
inside one `SqliteDB.run`: it drops the events whose id is already recorded, then records
the ids and applies the effects together. The tables are described in `profile_store`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from oo_ml.domain.events import (
    Action,
    Event,
    Integration,
    IntegrationChange,
    TaskSynced,
    TipFeedback,
    TipServed,
    TipViewed,
)

DAY_S = 86400


def day_of(t: float) -> int:
    """The UTC day number of a unix time: the bucket key."""
    return int(t // DAY_S)


@dataclass(slots=True)
class _Day:
    served: int = 0
    last_served_at: float = 0.0
    feedback: int = 0
    completed: int = 0
    dismissed: int = 0
    snoozed: int = 0
    last_feedback_at: float = 0.0
    last_completed_at: float = 0.0
    views: int = 0
    dwell_ms_sum: float = 0.0
    last_view_at: float = 0.0

    def row(self) -> tuple[float, ...]:
        """In the column order of ingest_daily after (user_id, day)."""
        return (
            self.served,
            self.last_served_at,
            self.feedback,
            self.completed,
            self.dismissed,
            self.snoozed,
            self.last_feedback_at,
            self.last_completed_at,
            self.views,
            self.dwell_ms_sum,
            self.last_view_at,
        )


# The batch writes pass their rows as one JSON array each, read back with json_each: a few
# statements per batch instead of one per event. The writer thread releases and re-takes the
# GIL around every SQLite call, and while the event loop is busy each re-take can wait; per
# event that cost was larger than the SQL itself (measured: 4x the batch time).
_UPSERT_DAYS = """
INSERT INTO ingest_daily (user_id, day, served, last_served_at, feedback, completed, dismissed,
    snoozed, last_feedback_at, last_completed_at, views, dwell_ms_sum, last_view_at)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
    value ->> 7, value ->> 8, value ->> 9, value ->> 10, value ->> 11, value ->> 12
FROM json_each(?) WHERE true
ON CONFLICT (user_id, day) DO UPDATE SET
    served = served + excluded.served,
    last_served_at = max(last_served_at, excluded.last_served_at),
    feedback = feedback + excluded.feedback,
    completed = completed + excluded.completed,
    dismissed = dismissed + excluded.dismissed,
    snoozed = snoozed + excluded.snoozed,
    last_feedback_at = max(last_feedback_at, excluded.last_feedback_at),
    last_completed_at = max(last_completed_at, excluded.last_completed_at),
    views = views + excluded.views,
    dwell_ms_sum = dwell_ms_sum + excluded.dwell_ms_sum,
    last_view_at = max(last_view_at, excluded.last_view_at)
"""

_UPSERT_HOURS = """
INSERT INTO ingest_completed_hours (user_id, day, hour, n)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?) WHERE true
ON CONFLICT (user_id, day, hour) DO UPDATE SET n = n + excluded.n
"""


def applied_among(conn: sqlite3.Connection, event_ids: Sequence[str]) -> set[str]:
    rows = conn.execute(
        "SELECT event_id FROM ingest_applied WHERE event_id IN (SELECT value FROM json_each(?))",
        (json.dumps(list(dict.fromkeys(event_ids))),),
    )
    return {r[0] for r in rows}


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """The writes of a batch of events, computed off the writer thread (see `plan_batch`)."""

    event_ids: tuple[str, ...]  # the first occurrence of each id, in order
    applied: str  # JSON [[event_id, kind], ...]
    days: str | None  # JSON rows of ingest_daily increments, serves excluded
    hours: str | None  # JSON rows of ingest_completed_hours increments
    serves: tuple[tuple[str, str, int, float], ...]  # (decision_id, user_id, day, at)
    others: tuple[Event, ...]  # task snapshots and integration events, applied one by one


def plan_batch(events: Sequence[Event], now: float) -> BatchPlan:
    """Aggregate the effects of events, assuming none was applied before. Pure: no database.

    The consumer calls this on the event loop, so the writer thread only runs SQL."""
    ids: dict[str, Event] = {}
    for e in events:
        ids.setdefault(e.event_id, e)
    days: dict[tuple[str, int], _Day] = {}
    hours: dict[tuple[str, int, int], int] = {}
    serves: list[tuple[str, str, int, float]] = []
    others: list[Event] = []
    for e in ids.values():
        # A producer clock ahead of ours must not put counts in a day that has not come yet.
        at = min(e.occurred_at, now)
        p = e.payload
        if isinstance(p, TipServed):
            serves.append((p.decision_id, e.user_id, day_of(at), at))
        elif isinstance(p, TipViewed):
            # proto3 cannot tell an unmeasured dwell from 0 ms; a 0 ms view says nothing.
            if p.dwell_ms > 0:
                d = days.setdefault((e.user_id, day_of(at)), _Day())
                d.views += 1
                d.dwell_ms_sum += p.dwell_ms
                d.last_view_at = max(d.last_view_at, at)
        elif isinstance(p, TipFeedback):
            d = days.setdefault((e.user_id, day_of(at)), _Day())
            d.feedback += 1
            d.last_feedback_at = max(d.last_feedback_at, at)
            if p.action is Action.COMPLETED:
                d.completed += 1
                d.last_completed_at = max(d.last_completed_at, at)
                key = (e.user_id, day_of(at), int(at % DAY_S) // 3600)
                hours[key] = hours.get(key, 0) + 1
            elif p.action is Action.DISMISSED:
                d.dismissed += 1
            else:
                d.snoozed += 1
        else:
            others.append(e)
    return BatchPlan(
        event_ids=tuple(ids),
        # Remember an id until its event is stale by *our* clock too: an event from a
        # producer whose clock runs ahead would otherwise be forgotten while still fresh.
        applied=json.dumps([(e.event_id, e.kind, max(now, e.occurred_at)) for e in ids.values()]),
        days=json.dumps([[u, day, *d.row()] for (u, day), d in days.items()]) if days else None,
        hours=json.dumps([[*k, n] for k, n in hours.items()]) if hours else None,
        serves=tuple(serves),
        others=tuple(others),
    )


def _write(conn: sqlite3.Connection, plan: BatchPlan, now: float) -> None:
    conn.execute(
        "INSERT INTO ingest_applied (event_id, applied_at, kind)"
        " SELECT value ->> 0, value ->> 2, value ->> 1 FROM json_each(?)",
        (plan.applied,),
    )
    if plan.days is not None:
        conn.execute(_UPSERT_DAYS, (plan.days,))
    if plan.hours is not None:
        conn.execute(_UPSERT_HOURS, (plan.hours,))
    if plan.serves:
        # A decision counts once, whoever reports its serve and however often.
        new = {
            r[0]
            for r in conn.execute(
                "INSERT OR IGNORE INTO ingest_served (decision_id, user_id, recorded_at)"
                " SELECT value ->> 0, value ->> 1, ? FROM json_each(?) WHERE true"
                " RETURNING decision_id",
                (now, json.dumps([s[:2] for s in plan.serves])),
            )
        }
        served: dict[tuple[str, int], _Day] = {}
        for decision_id, user, day, at in plan.serves:
            if decision_id in new:
                new.discard(decision_id)
                d = served.setdefault((user, day), _Day())
                d.served += 1
                d.last_served_at = max(d.last_served_at, at)
        if served:
            rows = [[u, day, *d.row()] for (u, day), d in served.items()]
            conn.execute(_UPSERT_DAYS, (json.dumps(rows),))
    for e in plan.others:
        at = min(e.occurred_at, now)
        if isinstance(e.payload, TaskSynced):
            _replace_tasks(conn, e.user_id, e.payload, at)
        elif isinstance(e.payload, Integration):
            _record_integration(conn, e.event_id, e.user_id, e.payload, at)


def record_events(
    conn: sqlite3.Connection, events: Sequence[Event], now: float, plan: BatchPlan | None = None
) -> list[bool]:
    """Record each event's id and apply its effect, unless its id is already recorded.
    Returns, per event, True if it took effect now, False if it was a duplicate (of an
    event recorded before, or of an earlier copy in the same batch).

    Runs inside one SqliteDB.run: the ids and the effects commit together or not at all,
    which is what makes a redelivery after a crash harmless. `plan` is `plan_batch(events)`
    made beforehand; it is only recomputed here when some events turn out to be duplicates."""
    plan = plan or plan_batch(events, now)
    applied = applied_among(conn, plan.event_ids)
    if applied:
        plan = plan_batch([e for e in events if e.event_id not in applied], now)
    fresh: list[bool] = []
    seen = set(applied)
    for e in events:
        fresh.append(e.event_id not in seen)
        seen.add(e.event_id)
    if plan.event_ids:
        _write(conn, plan, now)
    return fresh


def _replace_tasks(conn: sqlite3.Connection, user_id: str, sync: TaskSynced, at: float) -> None:
    row = conn.execute(
        "SELECT synced_at FROM ingest_task_syncs WHERE user_id = ? AND provider = ?",
        (user_id, sync.provider),
    ).fetchone()
    if row is not None and row[0] > at:
        return  # a late, older snapshot must not undo a newer one
    conn.execute(
        "INSERT INTO ingest_task_syncs (user_id, provider, synced_at) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id, provider) DO UPDATE SET synced_at = excluded.synced_at",
        (user_id, sync.provider, at),
    )
    conn.execute(
        "DELETE FROM ingest_tasks WHERE user_id = ? AND provider = ?", (user_id, sync.provider)
    )
    conn.executemany(
        "INSERT INTO ingest_tasks (user_id, provider, task_id, title, due_at, priority, completed)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (user_id, sync.provider, t.task_id, t.title, t.due_at, t.priority, int(t.completed))
            for t in sync.tasks
        ],
    )


def _record_integration(
    conn: sqlite3.Connection, event_id: str, user_id: str, p: Integration, at: float
) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO ingest_integration_events (event_id, user_id, provider, change,"
        " occurred_at, detail, attempt, retryable) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (event_id, user_id, p.provider, p.change.value, at, p.detail, p.attempt, int(p.retryable)),
    )
    failed = p.change is IntegrationChange.SYNC_FAILED
    # Events may arrive out of order: the state follows the latest, the log keeps them all.
    conn.execute(
        "INSERT INTO ingest_integrations (user_id, provider, status, updated_at, detail, failures)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, provider) DO UPDATE SET"
        " status = excluded.status, updated_at = excluded.updated_at, detail = excluded.detail,"
        " failures = CASE WHEN excluded.status = 'sync_failed' THEN failures + 1 ELSE 0 END"
        " WHERE excluded.updated_at >= ingest_integrations.updated_at",
        (user_id, p.provider, p.change.value, at, p.detail, int(failed)),
    )

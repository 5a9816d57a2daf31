"""The ingest's writes: a batch of events -> rows of the profile tables, in one transaction.

`plan_batch` aggregates a batch (per user and UTC day, per hour for completions: the
store-neutral `profile_model.effects_of`) without touching the database, on the event
loop; `record_events` runs on SQLite's writer thread inside one `SqliteDB.run`: it drops
the events whose id is already recorded, then records the ids and applies the effects
together. The tables are described in `profiles`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from oo_ml.domain.events import Event, Integration, TaskSynced
from oo_ml.stores.profile_model import (
    Day,
    applied_until,
    effects_of,
    integration_after,
    replaces_snapshot,
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
    """Aggregate the effects of events (`effects_of`), assuming none was applied before,
    as the JSON rows of the statements. Pure: no database.

    The consumer calls this on the event loop, so the writer thread only runs SQL."""
    fx = effects_of(events, now)
    return BatchPlan(
        event_ids=tuple(fx.first),
        # Remember an id until its event is stale by *our* clock too: an event from a
        # producer whose clock runs ahead would otherwise be forgotten while still fresh.
        applied=json.dumps(
            [(e.event_id, e.kind, applied_until(e, now)) for e in fx.first.values()]
        ),
        days=json.dumps([[u, day, *d.row()] for (u, day), d in fx.days.items()])
        if fx.days
        else None,
        hours=json.dumps([[*k, n] for k, n in fx.hours.items()]) if fx.hours else None,
        serves=tuple(fx.serves),
        others=tuple(fx.others),
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
        served: dict[tuple[str, int], Day] = {}
        for decision_id, user, day, at in plan.serves:
            if decision_id in new:
                new.discard(decision_id)
                d = served.setdefault((user, day), Day())
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
    if not replaces_snapshot(row[0] if row is not None else None, at):
        return
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
    row = conn.execute(
        "SELECT status, updated_at, failures FROM ingest_integrations"
        " WHERE user_id = ? AND provider = ?",
        (user_id, p.provider),
    ).fetchone()
    after = integration_after(
        (str(row[0]), float(row[1]), int(row[2])) if row is not None else None, p.change, at
    )
    if after is None:
        return  # older than the state: logged only
    conn.execute(
        "INSERT INTO ingest_integrations (user_id, provider, status, updated_at, detail, failures)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, provider) DO UPDATE SET"
        " status = excluded.status, updated_at = excluded.updated_at, detail = excluded.detail,"
        " failures = excluded.failures",
        (user_id, p.provider, after[0], at, p.detail, after[1]),
    )

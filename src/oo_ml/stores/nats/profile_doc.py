"""One user's profile as one JetStream KV value: everything the ingest keeps for the user,
so that an event's effect and its dedupe mark land in one compare-and-set write.

The value is two lines of compact JSON (JSON escapes every newline inside a string, so the
first b"\\n" ends the first line):

    hot   what Score reads on a cache miss, decoded alone (`features_at`):
          {"v": 1,
           "d": [[day, served, last_served_at, feedback, completed, dismissed, snoozed,
                  last_feedback_at, last_completed_at, views, dwell_ms_sum, last_view_at]],
           "h": [[day, hour, completed]],
           "s": {provider: [synced_at, [due_at or null of each open task]]},
           "i": {provider: [status, updated_at, detail, failures]}}
    cold  what only writes, open_tasks and inspection read:
          {"t": {provider: [[task_id, title, due_at, priority]]},     open tasks only
           "a": [[applied_at, "<base64url of 16-byte digests>"]],    applied event ids
           "s": [[recorded_at, "<base64url of 16-byte digests>"]],   counted decision ids
           "l": [[event_id, provider, change, occurred_at, detail, attempt, retryable]]}

Event and decision ids are kept as 16-byte BLAKE2b digests (a collision among 2^64 ids is
as likely as not; a user's week holds a few thousand), grouped by their time, so a busy
user's week of ids costs about 22 bytes each. The same digest names the id in the shared
applied-id index (`profiles`), whose keys must be short, fixed and subject-safe anyway.

Completed tasks are dropped at write: every read of SQLite's task table skips them too.
Pruning is lazy: a write first drops what the last `Horizon` (set by `prune`) forgets, so
a document that is never written again keeps old days that no read looks at.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from oo_ml.domain.events import Event, Integration, TaskSynced
from oo_ml.domain.features import StoredValue, TaskView
from oo_ml.errors import UnreadableRecord, UnsupportedFormat
from oo_ml.stores.profile_model import (
    Day,
    TaskCounts,
    applied_until,
    day_of,
    effects_of,
    first_window_day,
    integration_after,
    open_task_order,
    preferred_hour,
    profile_features,
    replaces_snapshot,
    valid_until,
)

FORMAT = 1
_DIGEST = 16


def digest(text: str) -> bytes:
    """The 16-byte digest that stands for an event or decision id."""
    return hashlib.blake2b(text.encode(), digest_size=_DIGEST).digest()


def digest_token(d: bytes) -> str:
    """A digest as a 22-character key or subject token (base64url, no padding)."""
    return base64.urlsafe_b64encode(d).rstrip(b"=").decode()


def _pack(ids: dict[bytes, float]) -> list[list[Any]]:
    groups: dict[float, list[bytes]] = {}
    for d, t in ids.items():
        groups.setdefault(t, []).append(d)
    return [[t, base64.urlsafe_b64encode(b"".join(ds)).decode()] for t, ds in groups.items()]


def _unpack(groups: Iterable[Sequence[Any]]) -> dict[bytes, float]:
    out: dict[bytes, float] = {}
    for t, packed in groups:
        blob = base64.urlsafe_b64decode(packed)
        for i in range(0, len(blob), _DIGEST):
            out[blob[i : i + _DIGEST]] = float(t)
    return out


@dataclass(frozen=True, slots=True)
class Horizon:
    """What the last `prune` forgot: days before `day`, ids applied (and decisions
    counted) before `applied`, integration events that occurred before `log`."""

    day: int = 0
    applied: float = 0.0
    log: float = 0.0

    def merge(self, other: Horizon) -> Horizon:
        """The later of each (a prune never brings anything back)."""
        return Horizon(
            max(self.day, other.day), max(self.applied, other.applied), max(self.log, other.log)
        )

    def encode(self) -> bytes:
        return json.dumps([self.day, self.applied, self.log]).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> Horizon:
        if value is None:
            return cls()
        try:
            day, applied, log = json.loads(value)
            return cls(int(day), float(applied), float(log))
        except (ValueError, TypeError) as e:
            raise UnreadableRecord(f"profile horizon: {e}") from e


@dataclass(slots=True)
class Written:
    """What one write of a document did: the ids applied now and those found applied
    before, each with its applied_at (both go to the shared index), and the day counters
    it added (for the totals)."""

    fresh: dict[str, float] = field(default_factory=dict)
    known: dict[str, float] = field(default_factory=dict)
    days: dict[int, Day] = field(default_factory=dict)


@dataclass(slots=True)
class ProfileDoc:
    days: dict[int, Day] = field(default_factory=dict)
    hours: dict[tuple[int, int], int] = field(default_factory=dict)  # (day, hour) -> completed
    # provider -> (synced_at, {task_id: (title, due_at, priority)}) of open tasks
    tasks: dict[str, tuple[float, dict[str, tuple[str, float | None, int]]]] = field(
        default_factory=dict
    )
    # provider -> (status, updated_at, detail, failures)
    integrations: dict[str, tuple[str, float, str, int]] = field(default_factory=dict)
    applied: dict[bytes, float] = field(default_factory=dict)  # event digest -> applied_at
    served: dict[bytes, float] = field(default_factory=dict)  # decision digest -> recorded_at
    # event_id -> (provider, change, occurred_at, detail, attempt, retryable)
    log: dict[str, tuple[str, str, float, str, int, bool]] = field(default_factory=dict)

    # -- encoding ---------------------------------------------------------------------------

    def encode(self) -> bytes:
        hot = {
            "v": FORMAT,
            "d": [[day, *d.row()] for day, d in self.days.items()],
            "h": [[day, hour, n] for (day, hour), n in self.hours.items()],
            "s": {p: [at, [t[1] for t in ts.values()]] for p, (at, ts) in self.tasks.items()},
            "i": {p: list(s) for p, s in self.integrations.items()},
        }
        cold = {
            "t": {p: [[k, *t] for k, t in ts.items()] for p, (_, ts) in self.tasks.items()},
            "a": _pack(self.applied),
            "s": _pack(self.served),
            "l": [[k, *v] for k, v in self.log.items()],
        }
        return _dumps(hot) + b"\n" + _dumps(cold)

    @classmethod
    def decode(cls, value: bytes | None) -> ProfileDoc:
        if value is None:
            return cls()
        hot_line, _, cold_line = value.partition(b"\n")
        hot = _hot(hot_line)
        try:
            cold = json.loads(cold_line)
            synced = {p: float(v[0]) for p, v in hot["s"].items()}
            return cls(
                days={int(r[0]): Day.of_row(r[1:]) for r in hot["d"]},
                hours={(int(d), int(h)): int(n) for d, h, n in hot["h"]},
                tasks={
                    p: (synced[p], {k: (title, due, int(prio)) for k, title, due, prio in ts})
                    for p, ts in cold["t"].items()
                },
                integrations={
                    p: (str(s), float(at), str(detail), int(n))
                    for p, (s, at, detail, n) in hot["i"].items()
                },
                applied=_unpack(cold["a"]),
                served=_unpack(cold["s"]),
                log={
                    r[0]: (r[1], r[2], float(r[3]), r[4], int(r[5]), bool(r[6])) for r in cold["l"]
                },
            )
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise UnreadableRecord(f"profile document: {type(e).__name__}: {e}") from e

    # -- writes -----------------------------------------------------------------------------

    def forget(self, horizon: Horizon) -> None:
        """Drop what the last prune forgot (the SQLite store deletes the same rows)."""
        self.days = {d: v for d, v in self.days.items() if d >= horizon.day}
        self.hours = {k: n for k, n in self.hours.items() if k[0] >= horizon.day}
        self.applied = {k: t for k, t in self.applied.items() if t >= horizon.applied}
        self.served = {k: t for k, t in self.served.items() if t >= horizon.applied}
        self.log = {k: v for k, v in self.log.items() if v[2] >= horizon.log}

    def record(self, events: Sequence[Event], now: float) -> Written:
        """Apply the events whose id this document has not applied (first copies of one
        user's events), and mark their ids, in this one value."""
        out = Written()
        fresh: list[Event] = []
        for e in events:
            known = self.applied.get(digest(e.event_id))
            if known is None:
                fresh.append(e)
                out.fresh[e.event_id] = applied_until(e, now)
            else:
                out.known[e.event_id] = known
        fx = effects_of(fresh, now)
        for (_, day), d in fx.days.items():
            self._add(out, day, d)
        for (_, day, hour), n in fx.hours.items():
            self.hours[day, hour] = self.hours.get((day, hour), 0) + n
        for decision_id, _, day, at in fx.serves:
            # A decision counts once, whoever reports its serve and however often.
            key = digest(decision_id)
            if key not in self.served:
                self.served[key] = now
                self._add(out, day, Day(served=1, last_served_at=at))
        for e in fx.others:
            at = min(e.occurred_at, now)
            if isinstance(e.payload, TaskSynced):
                self._replace_tasks(e.payload, at)
            elif isinstance(e.payload, Integration):
                self._integration(e.event_id, e.payload, at)
        for event_id, applied_at in out.fresh.items():
            self.applied[digest(event_id)] = applied_at
        return out

    def _add(self, out: Written, day: int, d: Day) -> None:
        self.days.setdefault(day, Day()).add(d)
        out.days.setdefault(day, Day()).add(d)

    def _replace_tasks(self, sync: TaskSynced, at: float) -> None:
        current = self.tasks.get(sync.provider)
        if not replaces_snapshot(current[0] if current else None, at):
            return
        open_ = {t.task_id: (t.title, t.due_at, t.priority) for t in sync.tasks if not t.completed}
        self.tasks[sync.provider] = (at, open_)

    def _integration(self, event_id: str, p: Integration, at: float) -> None:
        # The log keeps every event (the first copy of an id); the state follows the latest.
        self.log.setdefault(
            event_id, (p.provider, p.change.value, at, p.detail, p.attempt, p.retryable)
        )
        current = self.integrations.get(p.provider)
        state = None if current is None else (current[0], current[1], current[3])
        after = integration_after(state, p.change, at)
        if after is not None:
            self.integrations[p.provider] = (after[0], at, p.detail, after[1])

    # -- reads ------------------------------------------------------------------------------

    def open_tasks(self, now: float, limit: int, ttl_s: float) -> list[TaskView]:
        """Open tasks, overdue first (`open_task_order`); none when the latest snapshot is
        older than the TTL: stale tasks mislead a prompt."""
        if not self.tasks:
            return []
        synced = max(at for at, _ in self.tasks.values())
        if ttl_s and now - synced > ttl_s:
            return []
        rows = [(k, *t) for _, ts in self.tasks.values() for k, t in ts.items()]
        rows.sort(key=lambda r: open_task_order(r[0], r[2], r[3], now))
        return [
            TaskView(title, due, prio, due is not None and due < now)
            for _, title, due, prio in rows[:limit]
        ]

    def totals(self, horizon: Horizon) -> Day:
        """The counters of the days the last prune kept."""
        return Day.total(d for day, d in self.days.items() if day >= horizon.day)


def features_at(value: bytes | None, now: float) -> tuple[dict[str, StoredValue], float]:
    """The stored features at `now` and until when they hold (`valid_until`), from the
    hot line alone: a cache miss on the Score path decodes no ids, titles or logs."""
    if value is None:
        return {}, valid_until(now, None)
    hot = _hot(value.partition(b"\n")[0])
    try:
        first, today = first_window_day(now), day_of(now)
        sums = Day.total(Day.of_row(r[1:]) for r in hot["d"] if first <= r[0] <= today)
        by_hour: dict[int, int] = {}
        for day, hour, n in hot["h"]:
            if first <= day <= today:
                by_hour[hour] = by_hour.get(hour, 0) + n
        tasks = None
        next_due = None
        if hot["s"]:
            dues = [due for _, ds in hot["s"].values() for due in ds]
            overdue = sum(1 for due in dues if due is not None and due < now)
            tasks = TaskCounts(max(float(v[0]) for v in hot["s"].values()), len(dues), overdue)
            next_due = min((due for due in dues if due is not None and due >= now), default=None)
        return profile_features(sums, preferred_hour(by_hour), tasks), valid_until(now, next_due)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise UnreadableRecord(f"profile document: {type(e).__name__}: {e}") from e


def _hot(line: bytes) -> dict[str, Any]:
    try:
        hot = json.loads(line)
        version = int(hot["v"])
    except (ValueError, TypeError, KeyError) as e:
        raise UnreadableRecord(f"profile document: {type(e).__name__}: {e}") from e
    if version > FORMAT:
        raise UnsupportedFormat(f"profile document format {version}; this build reads {FORMAT}")
    return hot  # type: ignore[no-any-return]


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

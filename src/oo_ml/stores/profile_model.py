"""What every profile store computes the same way, whatever it stores the rows in.

The SQLite tables (`stores.sqlite.profiles`) and the JetStream user documents
(`stores.nats.profiles`) keep the same facts: per user and UTC day the counters of
`Day`, completed tips per UTC hour, task snapshots and integration states. This module
holds the rules both apply, so the two stores cannot drift apart:

- `effects_of`: a batch of events -> per (user, day) counter increments, completions per
  hour, serves to count once per decision, and the events applied one by one (task
  snapshots, integration changes). Pure; each store writes the result its own way.
- `profile_features`: window sums -> the stored features (a feature with no data in the
  window is left out, so the contract's fallback applies; `updated_at` is the time of the
  last contributing event, so the contract's TTL applies).
- `in_zone`: the preferred hour (bucketed in UTC) given in the request's time zone.
- `open_task_order`, `replaces_snapshot`, `integration_after`: the read order of open
  tasks and the two rules for events that may arrive out of order.
- `CachedFeatures`: the hot path's in-memory feature cache, which both stores put in
  front of their reads.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from oo_ml.domain.contracts import Contracts
from oo_ml.domain.events import (
    Action,
    Event,
    IntegrationChange,
    TipFeedback,
    TipServed,
    TipViewed,
)
from oo_ml.domain.features import StoredValue, utc_offset_minutes
from oo_ml.domain.ports import EVERY_USER, PROFILE, Change

DAY_S = 86400
WINDOW_DAYS = 30
"""Profile features are sums over the 30 UTC days ending today."""

OPEN_TASKS = "open_tasks"
OVERDUE_TASKS = "overdue_tasks"
COMPLETION_RATE = "completion_rate_30d"
DISMISS_RATE = "dismiss_rate_30d"
MEAN_DWELL = "mean_dwell_ms_30d"
PREFERRED_HOUR = "preferred_hour"
TIP_VOLUME = "tip_volume_30d"
NAMES = frozenset(
    {
        OPEN_TASKS,
        OVERDUE_TASKS,
        COMPLETION_RATE,
        DISMISS_RATE,
        MEAN_DWELL,
        PREFERRED_HOUR,
        TIP_VOLUME,
    }
)


def day_of(t: float) -> int:
    """The UTC day number of a unix time: the bucket key."""
    return int(t // DAY_S)


def first_window_day(now: float) -> int:
    return day_of(now) - WINDOW_DAYS + 1


def task_ttl(contracts: Contracts) -> float:
    """The open_tasks contract's TTL, after checking every feature named here has a
    contract: the names are the proto contracts', so a renamed one fails at start-up."""
    if not contracts.keys() >= NAMES:
        raise RuntimeError(f"features without a contract: {NAMES - contracts.keys()}")
    return contracts[OPEN_TASKS].ttl_seconds


@dataclass(slots=True)
class Day:
    """One user's counters of one UTC day."""

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

    @classmethod
    def of_row(cls, row: Sequence[float]) -> Day:
        """The inverse of `row`."""
        s, ls, f, c, d, sn, lf, lc, v, dw, lv = row
        return cls(int(s), ls, int(f), int(c), int(d), int(sn), lf, lc, int(v), dw, lv)

    @classmethod
    def total(cls, days: Iterable[Day]) -> Day:
        """The days summed (a window's sums, with its latest event times)."""
        out = cls()
        for d in days:
            out.add(d)
        return out

    def add(self, other: Day) -> None:
        """Counts add up, the last-event times keep the later one (the SQL upsert's rule)."""
        self.served += other.served
        self.last_served_at = max(self.last_served_at, other.last_served_at)
        self.feedback += other.feedback
        self.completed += other.completed
        self.dismissed += other.dismissed
        self.snoozed += other.snoozed
        self.last_feedback_at = max(self.last_feedback_at, other.last_feedback_at)
        self.last_completed_at = max(self.last_completed_at, other.last_completed_at)
        self.views += other.views
        self.dwell_ms_sum += other.dwell_ms_sum
        self.last_view_at = max(self.last_view_at, other.last_view_at)

    def counts(self) -> tuple[float, ...]:
        """The counters `totals` reports, in the order of `TOTALS`."""
        return (
            self.served,
            self.feedback,
            self.completed,
            self.dismissed,
            self.snoozed,
            self.views,
            self.dwell_ms_sum,
        )


TOTALS = ("served", "feedback", "completed", "dismissed", "snoozed", "views", "dwell")
"""The names of `Day.counts()` in `ProfileStore.totals`, beside `applied_events`."""


def applied_until(event: Event, now: float) -> float:
    """When an event's id was applied, for the dedupe window: the later of the apply time
    and occurred_at, so a producer clock ahead of ours cannot outlive its id's memory."""
    return max(now, event.occurred_at)


@dataclass(slots=True)
class Effects:
    """The effects of a batch of events, assuming none was applied before."""

    first: dict[str, Event] = field(default_factory=dict)  # event_id -> first copy, in order
    days: dict[tuple[str, int], Day] = field(default_factory=dict)  # serves excluded
    hours: dict[tuple[str, int, int], int] = field(default_factory=dict)  # (user, day, hour)
    serves: list[tuple[str, str, int, float]] = field(
        default_factory=list
    )  # (decision, user, day, at)
    others: list[Event] = field(default_factory=list)  # task snapshots, integrations: in order


def effects_of(events: Iterable[Event], now: float) -> Effects:
    """Aggregate the effects of events (the first copy of each id). Pure: no store."""
    out = Effects()
    for e in events:
        out.first.setdefault(e.event_id, e)
    for e in out.first.values():
        # A producer clock ahead of ours must not put counts in a day that has not come yet.
        at = min(e.occurred_at, now)
        p = e.payload
        if isinstance(p, TipServed):
            out.serves.append((p.decision_id, e.user_id, day_of(at), at))
        elif isinstance(p, TipViewed):
            # proto3 cannot tell an unmeasured dwell from 0 ms; a 0 ms view says nothing.
            if p.dwell_ms > 0:
                d = out.days.setdefault((e.user_id, day_of(at)), Day())
                d.views += 1
                d.dwell_ms_sum += p.dwell_ms
                d.last_view_at = max(d.last_view_at, at)
        elif isinstance(p, TipFeedback):
            d = out.days.setdefault((e.user_id, day_of(at)), Day())
            d.feedback += 1
            d.last_feedback_at = max(d.last_feedback_at, at)
            if p.action is Action.COMPLETED:
                d.completed += 1
                d.last_completed_at = max(d.last_completed_at, at)
                key = (e.user_id, day_of(at), int(at % DAY_S) // 3600)
                out.hours[key] = out.hours.get(key, 0) + 1
            elif p.action is Action.DISMISSED:
                d.dismissed += 1
            else:
                d.snoozed += 1
        else:
            out.others.append(e)
    return out


def replaces_snapshot(current_synced_at: float | None, at: float) -> bool:
    """A task snapshot replaces the provider's unless that one is newer: a late, older
    snapshot must not undo a newer one."""
    return current_synced_at is None or current_synced_at <= at


def integration_after(
    current: tuple[str, float, int] | None, change: IntegrationChange, at: float
) -> tuple[str, int] | None:
    """The (status, failures) after an integration event, given the current (status,
    updated_at, failures); None when the event is older than the state and only logged.
    Events may arrive out of order: the state follows the latest, failures count the
    sync failures in a row."""
    failed = change is IntegrationChange.SYNC_FAILED
    if current is None:
        return change.value, int(failed)
    _, updated_at, failures = current
    if at < updated_at:
        return None
    return change.value, failures + 1 if failed else 0


def preferred_hour(completions: Mapping[int, int]) -> int | None:
    """The UTC hour with the most completions (the earliest of a tie); None without any."""
    if not completions:
        return None
    return min(completions, key=lambda h: (-completions[h], h))


@dataclass(frozen=True, slots=True)
class TaskCounts:
    synced_at: float  # the latest snapshot of any provider
    open: int
    overdue: int


def profile_features(
    sums: Day, hour: int | None, tasks: TaskCounts | None
) -> dict[str, StoredValue]:
    """The stored features from the window's sums (`Day.total`), the preferred hour
    (`preferred_hour`) and the open tasks: only those with data, each dated by its last
    event."""
    out: dict[str, StoredValue] = {}
    if sums.served > 0:
        out[TIP_VOLUME] = StoredValue(float(sums.served), sums.last_served_at)
    if sums.feedback > 0:
        out[COMPLETION_RATE] = StoredValue(sums.completed / sums.feedback, sums.last_feedback_at)
        out[DISMISS_RATE] = StoredValue(sums.dismissed / sums.feedback, sums.last_feedback_at)
    if sums.views > 0:
        out[MEAN_DWELL] = StoredValue(sums.dwell_ms_sum / sums.views, sums.last_view_at)
    if hour is not None:
        out[PREFERRED_HOUR] = StoredValue(float(hour), sums.last_completed_at)
    if tasks is not None:
        out[OPEN_TASKS] = StoredValue(float(tasks.open), tasks.synced_at)
        out[OVERDUE_TASKS] = StoredValue(float(tasks.overdue), tasks.synced_at)
    return out


def valid_until(now: float, next_due: float | None) -> float:
    """Until when features read at `now` hold without a new event: the end of the UTC day
    (the 30-day window moves) or the next due time (a task turns overdue)."""
    until = float((day_of(now) + 1) * DAY_S)
    return until if next_due is None else min(until, next_due)


def open_task_order(
    task_id: str, due_at: float | None, priority: int, now: float
) -> tuple[bool, bool, float, int, str]:
    """The sort key of open tasks: overdue first, then by due time (none last), higher
    priority first, then task id (SQLite's ORDER BY, for stores that sort in Python)."""
    overdue = due_at is not None and due_at < now
    return (not overdue, due_at is None, due_at or 0.0, -priority, task_id)


def in_zone(stored: Mapping[str, StoredValue], timezone: str, now: float) -> dict[str, StoredValue]:
    """The features with the preferred hour in the request's zone. Completions are
    bucketed by UTC hour; the request's hour_of_day is local, and v2 compares the two."""
    out = dict(stored)
    hour = out.get(PREFERRED_HOUR)
    if hour is not None and timezone:
        local = (hour.value * 60 + utc_offset_minutes(timezone, now)) // 60 % 24
        out[PREFERRED_HOUR] = StoredValue(float(local), hour.updated_at)
    return out


class CachedFeatures:
    """The hot path's feature reads from memory, in front of a store's `_load_features`.

    Entries live `cache_s` at most (and never past the `valid_until` of their read), the
    writes of this process drop their users' entries at once (`_invalidate`), and a store
    shared with other processes drops them when its change feed reports their writes. A
    read that started before an invalidation of its user does not cache what it read: it
    may predate the write."""

    def __init__(self, cache_s: float, cache_users: int) -> None:
        self.cache_s = cache_s
        self.cache_users = cache_users
        # user -> (read at, monotonic; valid until, unix; the values)
        self._cache: OrderedDict[str, tuple[float, float, dict[str, StoredValue]]] = OrderedDict()
        self._invalidated_at: dict[str, float] = {}
        self._cleared_at = float("-inf")
        self.cache_hits = 0
        self.cache_misses = 0

    async def _load_features(
        self, user_id: str, now: float
    ) -> tuple[dict[str, StoredValue], float]:
        """The user's UTC features at `now` and their `valid_until`, from the store."""
        raise NotImplementedError

    async def stored_features(
        self, user_id: str, now: float, timezone: str = ""
    ) -> dict[str, StoredValue]:
        return in_zone(await self._utc_features(user_id, now), timezone, now)

    async def _utc_features(self, user_id: str, now: float) -> dict[str, StoredValue]:
        entry = self._cache.get(user_id)
        if entry is not None and now < entry[1] and time.monotonic() - entry[0] < self.cache_s:
            self._cache.move_to_end(user_id)
            self.cache_hits += 1
            return entry[2]
        self.cache_misses += 1
        read_at = time.monotonic()
        stored, until = await self._load_features(user_id, now)
        if (
            self.cache_s > 0
            and self._invalidated_at.get(user_id, 0.0) < read_at
            and self._cleared_at < read_at
        ):
            self._cache[user_id] = (read_at, until, stored)
            self._cache.move_to_end(user_id)
            while len(self._cache) > self.cache_users:
                self._cache.popitem(last=False)
        return stored

    def apply(self, changes: Sequence[Change]) -> None:
        """Profile writes other processes made (a change feed): drop the cached features
        of the users the changes name, and every entry on EVERY_USER."""
        users: set[str] = set()
        for c in changes:
            if c.user_id == EVERY_USER:
                self._invalidate_all()
            elif c.policy == PROFILE:
                users.add(c.user_id)
        self._invalidate(users)

    def _invalidate(self, users: Iterable[str]) -> None:
        now = time.monotonic()
        for u in users:
            self._cache.pop(u, None)
            self._invalidated_at[u] = now
        if len(self._invalidated_at) > self.cache_users:
            # Only reads that started before an invalidation need it; old marks can go.
            cutoff = now - 60.0
            self._invalidated_at = {u: t for u, t in self._invalidated_at.items() if t > cutoff}

    def hot_users(self, users: Iterable[str]) -> set[str]:
        """Those of `users` whose features are in memory now (Score reads them): the
        ones a write refreshes in place rather than drops (`_replace`)."""
        return {u for u in users if u in self._cache}

    def _replace(
        self,
        users: Iterable[str],
        fresh: Mapping[str, tuple[dict[str, StoredValue], float]],
        started: float,
    ) -> None:
        """This process's write of `users`, begun at `started` (time.monotonic()), has
        committed; `fresh` holds what some of them read in the write's own transaction
        (user -> features, valid until). Those are cached at once, so Score does not go
        back to the store after every event of a hot user; the others are dropped.

        Reads under way started before the write: they still do not cache (the mark is
        set first). And a user invalidated while the write was under way (another
        process's write, reported by the change feed, may be newer than ours) is only
        dropped."""
        raced = {
            u
            for u in fresh
            if self._invalidated_at.get(u, float("-inf")) >= started or self._cleared_at >= started
        }
        self._invalidate(users)
        if self.cache_s <= 0:
            return
        read_at = time.monotonic()
        for u, (stored, until) in fresh.items():
            if u not in raced:
                self._cache[u] = (read_at, until, stored)
                self._cache.move_to_end(u)
        while len(self._cache) > self.cache_users:
            self._cache.popitem(last=False)

    def _invalidate_all(self) -> None:
        """Forget every entry (the change feed lost track): reads under way do not cache."""
        self._cache.clear()
        self._invalidated_at.clear()
        self._cleared_at = time.monotonic()

    def cached_users(self) -> list[str]:
        """The users whose features are in memory (tests, operators)."""
        return list(self._cache)

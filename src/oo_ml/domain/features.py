"""Request-time feature assembly and the versioned vectorisers.

Assembly takes what the request gave (`Inputs`), fills each missing value from its
contract's source (server clock, task store, profile store) when that value is fresh
under the contract's TTL, and falls back to the contract's fallback otherwise. A value in
the request always wins. Every range, TTL and fallback comes from the contracts the caller
passes (read from the proto descriptors by `oo_ml.schema.contracts`).

The vectorisers turn assembled values into x:
  v1 (D=7):  bias, sin/cos hour, sin/cos weekday, open-task load, overdue-task load
  v2 (D=12): v1 + completion rate, dismiss rate, mean dwell (clipped at 10 min, scaled),
             preferred-hour alignment (cos of the hour gap), log tip volume
v2's first seven dimensions are v1's, which is what lets v1 state migrate to v2 by padding.
"""

from __future__ import annotations

import enum
import math
import time
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Protocol

import numpy as np
import numpy.typing as npt

from oo_ml.domain.contracts import Contracts, FeatureContract, Source

Vector = npt.NDArray[np.float64]


class Origin(enum.Enum):
    """Where an assembled value came from (mirrors scoring.v1.FeatureOrigin)."""

    REQUEST = 1
    SERVER_CLOCK = 2
    TASK_STORE = 3
    PROFILE_STORE = 4
    FALLBACK = 5

    # Enum hashes a member by its name in Python; members are singletons compared by
    # identity, so the identity hash agrees, in C (a Score hashes an origin per feature).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class StoredValue:
    value: float
    updated_at: float  # unix seconds


class FeatureStore(Protocol):
    """Supplies stored task-context and profile values, keyed by feature name. Hour-valued
    features come in the given IANA timezone (UTC when empty), like the request's context."""

    async def stored_features(
        self, user_id: str, now: float, timezone: str = ""
    ) -> Mapping[str, StoredValue]: ...


class NoStoredFeatures:
    """A FeatureStore with nothing in it (ingest off, or tests)."""

    async def stored_features(
        self, user_id: str, now: float, timezone: str = ""
    ) -> Mapping[str, StoredValue]:
        return {}


@dataclass(frozen=True, slots=True)
class TaskView:
    """One open task, as the prompt sees it. The title is user data: never log it."""

    title: str
    due_at: float | None  # unix seconds
    priority: int
    overdue: bool


class TaskSource(Protocol):
    """The user's open tasks from the task-context store (filled by TaskSynced events)."""

    async def open_tasks(self, user_id: str, now: float, limit: int) -> list[TaskView]: ...


class NoTasks:
    """A TaskSource with nothing in it (ingest off, or tests)."""

    async def open_tasks(self, user_id: str, now: float, limit: int) -> list[TaskView]:
        return []


@dataclass(frozen=True, slots=True)
class Inputs:
    """What the request supplied; None where it left a value out."""

    values: Mapping[str, float | None]
    timezone: str = ""


@dataclass(frozen=True, slots=True)
class Assembled:
    values: Mapping[str, float]
    origins: Mapping[str, Origin]
    now: float

    def __getitem__(self, name: str) -> float:
        return self.values[name]


@cache
def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone of that name; UTC for an empty name."""
    return zoneinfo.ZoneInfo(name or "UTC")


def utc_offset_minutes(tz: str, now: float) -> int:
    """The zone's offset from UTC at that instant, in minutes."""
    offset = datetime.fromtimestamp(now, UTC).astimezone(zone(tz)).utcoffset()
    return int(offset.total_seconds() // 60) if offset is not None else 0


def _clock_value(name: str, local: datetime) -> float | None:
    if name == "hour_of_day":
        return float(local.hour)
    if name == "day_of_week":
        return float(local.weekday())
    return None


def _fresh(contract: FeatureContract, stored: StoredValue | None, now: float) -> bool:
    if stored is None or not contract.in_range(stored.value) or not math.isfinite(stored.value):
        return False
    return contract.ttl_seconds == 0 or now - stored.updated_at <= contract.ttl_seconds


def assemble(
    contracts: Contracts,
    inputs: Inputs,
    stored: Mapping[str, StoredValue],
    now: float | None = None,
) -> Assembled:
    """Fill every contracted feature: request, then its source, then the fallback."""
    now = time.time() if now is None else now
    values: dict[str, float] = {}
    origins: dict[str, Origin] = {}
    local: datetime | None = None  # the user's local time, made once for every clock feature
    for name, contract in contracts.items():
        given = inputs.values.get(name)
        if given is not None:
            values[name], origins[name] = float(given), Origin.REQUEST
            continue
        if contract.source is Source.SERVER_CLOCK:
            if local is None:
                local = datetime.fromtimestamp(now, UTC).astimezone(zone(inputs.timezone))
            v = _clock_value(name, local)
            if v is not None:
                values[name], origins[name] = v, Origin.SERVER_CLOCK
                continue
        elif contract.source in (Source.TASK_STORE, Source.PROFILE_STORE):
            s = stored.get(name)
            if s is not None and _fresh(contract, s, now):
                origin = (
                    Origin.TASK_STORE
                    if contract.source is Source.TASK_STORE
                    else Origin.PROFILE_STORE
                )
                values[name], origins[name] = s.value, origin
                continue
        values[name], origins[name] = contract.fallback, Origin.FALLBACK
    return Assembled(values=values, origins=origins, now=now)


_TWO_PI = 2.0 * math.pi
_TASK_SCALE = math.log1p(100.0)  # 100 open tasks saturate the load feature
_DWELL_CLIP_MS = 600_000.0  # 10 minutes
_VOLUME_SCALE = math.log1p(1000.0)


def _load(n: float) -> float:
    return min(math.log1p(max(n, 0.0)) / _TASK_SCALE, 1.0)


def _v1_values(v: Mapping[str, float]) -> list[float]:
    h = v["hour_of_day"] / 24.0 * _TWO_PI
    d = v["day_of_week"] / 7.0 * _TWO_PI
    return [
        1.0,
        math.sin(h),
        math.cos(h),
        math.sin(d),
        math.cos(d),
        _load(v["open_tasks"]),
        _load(v["overdue_tasks"]),
    ]


def vectorise_v1(f: Assembled) -> Vector:
    return np.array(_v1_values(f.values), dtype=np.float64)


def vectorise_v2(f: Assembled) -> Vector:
    # One list and one array (not v1's array concatenated): a Score vectorises every call.
    v = f.values
    gap = (v["hour_of_day"] - v["preferred_hour"]) / 24.0 * _TWO_PI
    values = _v1_values(v)
    values += (
        v["completion_rate_30d"],
        v["dismiss_rate_30d"],
        min(v["mean_dwell_ms_30d"], _DWELL_CLIP_MS) / _DWELL_CLIP_MS,
        math.cos(gap),
        min(math.log1p(v["tip_volume_30d"]) / _VOLUME_SCALE, 1.0),
    )
    return np.array(values, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class FeatureVersion:
    name: str
    dim: int
    vectorise: Callable[[Assembled], Vector]


FEATURE_VERSIONS: dict[str, FeatureVersion] = {
    "v1": FeatureVersion("v1", 7, vectorise_v1),
    "v2": FeatureVersion("v2", 12, vectorise_v2),
}

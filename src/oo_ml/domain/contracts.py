"""Feature contracts as domain values: a feature's dtype, valid range, TTL, source and
fallback. No proto here: `oo_ml.schema.contracts` reads them from the descriptors (the
.proto files are their single source of truth) and hands them to the domain.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class Dtype(enum.Enum):
    FLOAT64 = "float64"
    UINT32 = "uint32"


class Source(enum.Enum):
    """Where the server finds a value the request left out."""

    REQUEST = "request"
    SERVER_CLOCK = "server_clock"
    TASK_STORE = "task_store"
    PROFILE_STORE = "profile_store"


@dataclass(frozen=True, slots=True)
class FeatureContract:
    """One feature's contract as declared in proto."""

    name: str
    dtype: Dtype
    min: float
    max: float
    ttl_seconds: int
    source: Source
    fallback: float
    description: str

    def in_range(self, value: float) -> bool:
        return self.min <= value <= self.max


Contracts = Mapping[str, FeatureContract]
"""Every contracted feature by name, in declaration order."""

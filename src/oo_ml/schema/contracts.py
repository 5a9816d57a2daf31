"""Feature contracts and field rules, read from the proto descriptors.

The .proto files are the single source of truth: `(oo.options.v1.feature)` declares each
context and profile feature's dtype, range, TTL, source and fallback, and
`(oo.options.v1.rules)` each request or event field's constraints. This module turns the
descriptors into frozen dataclasses once, at import, so nothing is mirrored by hand.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from oo.options.v1 import options_pb2
from oo.scoring.v1 import scoring_pb2


class Dtype(enum.Enum):
    FLOAT64 = options_pb2.DTYPE_FLOAT64
    UINT32 = options_pb2.DTYPE_UINT32


class Source(enum.Enum):
    REQUEST = options_pb2.SOURCE_REQUEST
    SERVER_CLOCK = options_pb2.SOURCE_SERVER_CLOCK
    TASK_STORE = options_pb2.SOURCE_TASK_STORE
    PROFILE_STORE = options_pb2.SOURCE_PROFILE_STORE


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


@dataclass(frozen=True, slots=True)
class FieldRules:
    """A field's validation rules as declared in proto (unset bounds are None)."""

    required: bool = False
    min: float | None = None
    max: float | None = None
    min_len: int = 0
    max_len: int = 0
    max_items: int = 0
    finite: bool = False
    unique_by: str = ""
    timezone: bool = False


def _feature_of(field: FieldDescriptor) -> FeatureContract | None:
    opts = field.GetOptions()
    if not opts.HasExtension(options_pb2.feature):
        return None
    c = opts.Extensions[options_pb2.feature]
    return FeatureContract(
        name=field.name,
        dtype=Dtype(c.dtype),
        min=c.min,
        max=c.max,
        ttl_seconds=c.ttl_seconds,
        source=Source(c.source),
        fallback=c.fallback,
        description=c.description,
    )


def features_of(message: Descriptor) -> tuple[FeatureContract, ...]:
    """The feature contracts declared on a message's fields, in field-number order."""
    found = (_feature_of(f) for f in sorted(message.fields, key=lambda f: f.number))
    return tuple(c for c in found if c is not None)


@cache
def rules_of(field: FieldDescriptor) -> FieldRules | None:
    """The rules declared on a field, or None when it has none."""
    opts = field.GetOptions()
    if not opts.HasExtension(options_pb2.rules):
        return None
    r = opts.Extensions[options_pb2.rules]
    return FieldRules(
        required=r.required,
        min=r.min if r.HasField("min") else None,
        max=r.max if r.HasField("max") else None,
        min_len=r.min_len,
        max_len=r.max_len,
        max_items=r.max_items,
        finite=r.finite,
        unique_by=r.unique_by,
        timezone=r.timezone,
    )


@cache
def feature_of(field: FieldDescriptor) -> FeatureContract | None:
    return _feature_of(field)


CONTEXT_FEATURES: tuple[FeatureContract, ...] = features_of(scoring_pb2.Context.DESCRIPTOR)
PROFILE_FEATURES: tuple[FeatureContract, ...] = features_of(scoring_pb2.ProfileFeatures.DESCRIPTOR)
ALL_FEATURES: dict[str, FeatureContract] = {c.name: c for c in CONTEXT_FEATURES + PROFILE_FEATURES}

MAX_CANDIDATES: int = (
    rules_of(scoring_pb2.ScoreRequest.DESCRIPTOR.fields_by_name["candidates"]) or FieldRules()
).max_items

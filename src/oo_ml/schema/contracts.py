"""The proto registry read at run time: feature contracts and field rules from the descriptors.

The .proto files are the single source of truth: `(oo.options.v1.feature)` declares each
context and profile feature's dtype, range, TTL, source and fallback, and
`(oo.options.v1.rules)` each request or event field's constraints. This module turns the
descriptors into frozen dataclasses once, at import, so nothing is mirrored by hand. The
contracts are domain values (`oo_ml.domain.contracts`); the rules serve `validation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from oo.options.v1 import options_pb2
from oo.scoring.v1 import scoring_pb2
from oo_ml.domain.contracts import Contracts, Dtype, FeatureContract, Source

_DTYPES = {options_pb2.DTYPE_FLOAT64: Dtype.FLOAT64, options_pb2.DTYPE_UINT32: Dtype.UINT32}
_SOURCES = {
    options_pb2.SOURCE_REQUEST: Source.REQUEST,
    options_pb2.SOURCE_SERVER_CLOCK: Source.SERVER_CLOCK,
    options_pb2.SOURCE_TASK_STORE: Source.TASK_STORE,
    options_pb2.SOURCE_PROFILE_STORE: Source.PROFILE_STORE,
}


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
        dtype=_DTYPES[c.dtype],
        min=c.min,
        max=c.max,
        ttl_seconds=c.ttl_seconds,
        source=_SOURCES[c.source],
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
ALL_FEATURES: Contracts = {c.name: c for c in CONTEXT_FEATURES + PROFILE_FEATURES}

MAX_CANDIDATES: int = (
    rules_of(scoring_pb2.ScoreRequest.DESCRIPTOR.fields_by_name["candidates"]) or FieldRules()
).max_items

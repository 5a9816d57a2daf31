"""Validation of any protobuf message against the rules and contracts declared in proto.

One walker serves the gRPC edge and the ingest decoder alike: it reads
`(oo.options.v1.rules)` and `(oo.options.v1.feature)` from each field's descriptor and
returns every violation, each naming its field by path (`candidates[2].tip_id`).
"""

from __future__ import annotations

import math
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from oo_ml.domain.contracts import FeatureContract
from oo_ml.errors import FieldViolation, InvalidArgument
from oo_ml.schema.contracts import FieldRules, feature_of, rules_of

_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_STRING = FieldDescriptor.TYPE_STRING


@cache
def _valid_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _num(v: float) -> str:
    # Exact for integers of any size; `:g` would print 86400000 as 8.64e+07.
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _scalar(path: str, value: Any, field: Any, rules: FieldRules) -> Iterator[str]:
    if field.type == _STRING:
        n = len(value)
        if rules.min_len and n < rules.min_len:
            yield f"must be at least {rules.min_len} characters"
        if rules.max_len and n > rules.max_len:
            yield f"must be at most {rules.max_len} characters (got {n})"
        if rules.timezone and value and not _valid_timezone(value):
            yield f"unknown IANA timezone {value[:64]!r}"
        return
    if field.type in _FLOATS and not math.isfinite(value):
        if rules.finite:
            yield f"must be a finite number (got {value})"
        return
    if rules.min is not None and value < rules.min:
        yield f"must be >= {_num(rules.min)} (got {value})"
    if rules.max is not None and value > rules.max:
        yield f"must be <= {_num(rules.max)} (got {value})"


@dataclass(frozen=True, slots=True)
class _Field:
    """What the walker needs of one field, read from its descriptor once."""

    name: str
    full_name: str
    type: int
    repeated: bool
    presence: bool
    rules: FieldRules | None
    contract: FeatureContract | None
    descriptor: Any


@cache
def _plan(descriptor: Any) -> tuple[_Field, ...]:
    """The fields of a message type that can hold a violation: those with rules or a
    contract, and messages that contain such fields. Cached per type, so a request pays
    for its own fields only (a Timestamp, say, is never walked)."""
    out = []
    for f in descriptor.fields:
        rules, contract = rules_of(f), feature_of(f)
        nested = f.type == _MESSAGE and bool(_plan(f.message_type))
        if rules is None and contract is None and not nested:
            continue
        out.append(
            _Field(f.name, f.full_name, f.type, f.is_repeated, f.has_presence, rules, contract, f)
        )
    return tuple(out)


def violations(
    msg: Message, prefix: str = "", max_items: dict[str, int] | None = None
) -> list[FieldViolation]:
    """Every rule and contract violation in msg. max_items overrides a field's max_items,
    keyed by its full proto name (the server's configurable candidate limit)."""
    out: list[FieldViolation] = []
    for field in _plan(msg.DESCRIPTOR):
        path = f"{prefix}{field.name}"
        rules = field.rules
        contract = field.contract
        if field.repeated:
            items = getattr(msg, field.name)
            if rules is not None:
                if rules.required and len(items) == 0:
                    out.append(FieldViolation(path, "at least one item is required"))
                limit = (max_items or {}).get(field.full_name, rules.max_items)
                if limit and len(items) > limit:
                    # Stop here: checking 5,000 items one by one helps nobody.
                    out.append(FieldViolation(path, f"at most {limit} items (got {len(items)})"))
                    continue
                if rules.unique_by and field.type == _MESSAGE:
                    seen: set[Any] = set()
                    for i, item in enumerate(items):
                        key = getattr(item, rules.unique_by)
                        if key in seen:
                            out.append(
                                FieldViolation(
                                    f"{path}[{i}].{rules.unique_by}",
                                    f"duplicate {rules.unique_by} {str(key)[:64]!r}",
                                )
                            )
                        seen.add(key)
            for i, item in enumerate(items):
                if field.type == _MESSAGE:
                    out.extend(violations(item, f"{path}[{i}].", max_items))
                elif rules is not None:
                    out.extend(
                        FieldViolation(f"{path}[{i}]", d)
                        for d in _scalar(path, item, field.descriptor, rules)
                    )
            continue

        present = msg.HasField(field.name) if field.presence else True
        value = getattr(msg, field.name)
        if rules is not None and rules.required:
            missing = not present if field.type == _MESSAGE else not value
            if missing:
                out.append(FieldViolation(path, "is required"))
                continue
        if field.type == _MESSAGE:
            if present:
                out.extend(violations(value, f"{path}.", max_items))
            continue
        if not present:
            continue
        if rules is not None:
            out.extend(
                FieldViolation(path, d) for d in _scalar(path, value, field.descriptor, rules)
            )
        if contract is not None:
            if field.type in _FLOATS and not math.isfinite(value):
                out.append(FieldViolation(path, f"must be a finite number (got {value})"))
            elif not contract.in_range(value):
                out.append(
                    FieldViolation(
                        path,
                        f"must be in [{_num(contract.min)}, {_num(contract.max)}] (got {value})",
                    )
                )
    return out


def validate(msg: Message, max_items: dict[str, int] | None = None) -> None:
    """Raise InvalidArgument listing every violation in msg, or return."""
    found = violations(msg, max_items=max_items)
    if found:
        raise InvalidArgument.of(found)

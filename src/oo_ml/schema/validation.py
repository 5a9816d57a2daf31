"""Validation of any protobuf message against the rules and contracts declared in proto.

One validator serves the gRPC edge and the ingest decoder alike. It reads
`(oo.options.v1.rules)` and `(oo.options.v1.feature)` from each field's descriptor, in two
forms built once per message type:

- `_compiled(type)`: a predicate made of one small check per constrained field, with no
  paths and no messages: the fast path every valid request takes;
- `violations(msg)`: the walker that names every violation by its path
  (`candidates[2].tip_id`); it runs only when the predicate says no.

Both read the same rules; a test holds them to the same verdict on generated messages.
"""

from __future__ import annotations

import math
import zoneinfo
from collections.abc import Callable, Iterator
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
    limits = tuple(sorted(max_items.items())) if max_items else ()
    if _compiled(msg.DESCRIPTOR, limits)(msg):
        return
    found = violations(msg, max_items=max_items)
    if found:
        raise InvalidArgument.of(found)


Check = Callable[[Any], bool]


def is_valid(msg: Message, max_items: dict[str, int] | None = None) -> bool:
    """The fast path's verdict alone (tests hold it to `violations`)."""
    limits = tuple(sorted(max_items.items())) if max_items else ()
    return _compiled(msg.DESCRIPTOR, limits)(msg)


@cache
def _compiled(descriptor: Any, limits: tuple[tuple[str, int], ...]) -> Check:
    """One predicate for a message type: True when the message has no violation.

    Generated as straight-line Python from the plan (one `if` per rule, no path strings,
    no generator per field): a valid ScoreRequest with ten candidates checks in a few
    microseconds. Nested message types get predicates of their own."""
    env: dict[str, Any] = {"isfinite": math.isfinite, "valid_tz": _valid_timezone}
    lines = ["def check(m):"]
    for i, field in enumerate(_plan(descriptor)):
        lines += _field_lines(field, limits, f"f{i}", env)
    lines.append("    return True")
    exec("\n".join(lines), env)  # source built from descriptors, never from input
    check: Check = env["check"]
    return check


def _value_tests(field: _Field, v: str, env: dict[str, Any], key: str) -> list[str]:
    """Conditions, each True for a bad value held in variable `v`."""
    rules, contract = field.rules, field.contract
    out: list[str] = []
    if field.type == _STRING:
        if rules is not None:
            if rules.min_len:
                out.append(f"len({v}) < {rules.min_len}")
            if rules.max_len:
                out.append(f"len({v}) > {rules.max_len}")
            if rules.timezone:
                out.append(f"({v} and not valid_tz({v}))")
        return out
    floats = field.type in _FLOATS
    if rules is not None:
        env[f"{key}_lo"], env[f"{key}_hi"] = rules.min, rules.max
        bounds = []
        if rules.min is not None:
            bounds.append(f"{v} < {key}_lo")
        if rules.max is not None:
            bounds.append(f"{v} > {key}_hi")
        if floats:
            # A non-finite float fails only a `finite` rule; it skips min and max.
            nonfinite = "True" if rules.finite else "False"
            inner = " or ".join(bounds) or "False"
            out.append(f"(({nonfinite}) if not isfinite({v}) else ({inner}))")
        else:
            out += bounds
    if contract is not None:
        env[f"{key}_cmin"], env[f"{key}_cmax"] = contract.min, contract.max
        out.append(f"not ({key}_cmin <= {v} <= {key}_cmax)")  # NaN and infinities fail
    return out


def _field_lines(
    field: _Field, limits: tuple[tuple[str, int], ...], key: str, env: dict[str, Any]
) -> list[str]:
    name, rules = field.name, field.rules
    required = rules is not None and rules.required
    out: list[str] = []
    if field.repeated:
        limit = dict(limits).get(field.full_name, rules.max_items if rules else 0)
        out.append(f"    items = m.{name}")
        out.append("    n = len(items)")
        if required:
            out.append("    if n == 0: return False")
        if limit:
            out.append(f"    if n > {limit}: return False")
        if rules is not None and rules.unique_by and field.type == _MESSAGE:
            out.append(f"    if len({{i.{rules.unique_by} for i in items}}) != n: return False")
        if field.type == _MESSAGE:
            env[key] = _compiled(field.descriptor.message_type, limits)
            out.append(f"    for i in items:\n        if not {key}(i): return False")
        elif rules is not None:
            tests = _value_tests(field, "i", env, key)
            if tests:
                out.append(f"    for i in items:\n        if {' or '.join(tests)}: return False")
        return out
    if field.type == _MESSAGE:
        env[key] = _compiled(field.descriptor.message_type, limits)
        out.append(f"    if m.HasField({name!r}):")
        out.append(f"        if not {key}(m.{name}): return False")
        if required:
            out.append("    else: return False")
        return out
    tests = _value_tests(field, "v", env, key)
    out.append(f"    v = m.{name}")
    if required:
        out.append("    if not v: return False")
    if tests:
        guard = f"m.HasField({name!r}) and " if field.presence else ""
        out.append(f"    if {guard}({' or '.join(tests)}): return False")
    return out

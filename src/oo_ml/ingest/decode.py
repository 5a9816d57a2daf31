"""Decoding: message bytes and headers -> a validated domain `Event`. No proto goes further.

An envelope is binary protobuf unless the header `Content-Type: application/json` says it
is proto3 JSON. It must carry a known `schema_version` and pass `oo_ml.schema.validation` (the
same rules as the gRPC edge). Whatever fails here raises `BadEvent` with a reason, and the
consumer dead-letters the message.

A valid envelope whose payload this build does not know (the oneof unset, a field number
added after this build, or a kind without a translator here) is `UnknownKind`: acked and
counted, never dead-lettered, so producers can roll out a new event kind before every
consumer knows it (ADR 0007). JSON is parsed with unknown fields ignored for the same
reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from oo.events.v1 import envelope_pb2, signals_pb2
from oo_ml.domain.events import (
    Action,
    Event,
    Integration,
    IntegrationChange,
    Payload,
    Task,
    TaskSynced,
    TipFeedback,
    TipServed,
    TipViewed,
    UnknownKind,
)
from oo_ml.errors import BadEvent, InvalidArgument
from oo_ml.schema.validation import validate

# "v1" is what the producers write (the schema package's version; a breaking change bumps
# it to "v2"). "1" is an alias kept for the TipServed events oo-ml itself published before
# it wrote "v1" (ADR 0009); anything else is dead-lettered with this list in the reason.
CURRENT_SCHEMA_VERSION = "v1"
KNOWN_SCHEMA_VERSIONS = frozenset({CURRENT_SCHEMA_VERSION, "1"})
JSON_CONTENT_TYPE = "application/json"


def _seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _task(t: signals_pb2.Task) -> Task:
    due = _seconds(t.due_time) if t.HasField("due_time") else None
    return Task(t.id, t.title, due, t.priority, t.completed)


# Validation has already refused TIP_ACTION_UNSPECIFIED (the field is required).
_ACTIONS = {
    signals_pb2.TIP_ACTION_COMPLETED: Action.COMPLETED,
    signals_pb2.TIP_ACTION_DISMISSED: Action.DISMISSED,
    signals_pb2.TIP_ACTION_SNOOZED: Action.SNOOZED,
}


# One translator per payload kind this build handles. Adding a kind = adding an entry here
# and its effect in `profile_store`; a kind missing here is UnknownKind, not an error.
_TRANSLATORS: dict[str, Callable[[Any], Payload]] = {
    "tip_served": lambda m: TipServed(m.decision_id, m.tip_id),
    "tip_viewed": lambda m: TipViewed(m.decision_id, m.tip_id, m.dwell_ms),
    "tip_feedback": lambda m: TipFeedback(m.decision_id, m.tip_id, _ACTIONS[m.action], m.dwell_ms),
    "task_synced": lambda m: TaskSynced(m.provider, tuple(_task(t) for t in m.tasks)),
    "integration_connected": lambda m: Integration(
        m.provider, IntegrationChange.CONNECTED, m.account_id
    ),
    "integration_disconnected": lambda m: Integration(
        m.provider, IntegrationChange.DISCONNECTED, m.reason
    ),
    "integration_sync_failed": lambda m: Integration(
        m.provider, IntegrationChange.SYNC_FAILED, m.error, m.attempt, m.retryable
    ),
}

# Keep the translators honest: every name must be a payload field of this build's Envelope.
_PAYLOAD_FIELDS = {
    f.name for f in envelope_pb2.Envelope.DESCRIPTOR.oneofs_by_name["payload"].fields
}
if not set(_TRANSLATORS) <= _PAYLOAD_FIELDS:
    raise RuntimeError(f"translators for no Envelope field: {set(_TRANSLATORS) - _PAYLOAD_FIELDS}")


def is_json(headers: Mapping[str, str] | None) -> bool:
    if not headers:
        return False
    for key, value in headers.items():
        if key.lower() == "content-type":
            return value.split(";", 1)[0].strip().lower() == JSON_CONTENT_TYPE
    return False


def parse(data: bytes, headers: Mapping[str, str] | None) -> envelope_pb2.Envelope:
    """The envelope in data, binary or proto3 JSON by header; BadEvent if unparseable."""
    env = envelope_pb2.Envelope()
    if is_json(headers):
        try:
            json_format.Parse(data.decode("utf-8"), env, ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError, RecursionError) as e:
            raise BadEvent(f"unparseable JSON envelope: {e}") from None
        return env
    try:
        env.ParseFromString(data)
    except DecodeError as e:
        raise BadEvent(f"unparseable protobuf envelope: {e}") from None
    return env


def decode(data: bytes, headers: Mapping[str, str] | None = None) -> Event | UnknownKind:
    """Parse, check the schema version, validate, translate. Raises BadEvent."""
    env = parse(data, headers)
    if env.schema_version not in KNOWN_SCHEMA_VERSIONS:
        known = ", ".join(sorted(KNOWN_SCHEMA_VERSIONS))
        raise BadEvent(f"unknown schema_version {env.schema_version[:32]!r} (known: {known})")
    try:
        validate(env)
    except InvalidArgument as e:
        raise BadEvent(f"invalid envelope: {e}") from None
    kind = env.WhichOneof("payload") or ""
    translate = _TRANSLATORS.get(kind)
    if translate is None:
        return UnknownKind(env.event_id, kind)
    return Event(
        event_id=env.event_id,
        user_id=env.user_id,
        occurred_at=_seconds(env.occurred_at),
        kind=kind,
        payload=translate(getattr(env, kind)),
    )

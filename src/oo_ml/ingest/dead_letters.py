"""Dead letters: a copy of a message that cannot be applied, on `dlq.<original subject>`.

Two ways in:
- the consumer found the payload unparseable or invalid: it copies the message here,
  waits for the DLQ stream's ack, and only then terminates the original (`term()`), so a
  failed copy leaves the message to be redelivered rather than lost;
- the message ran out of deliveries (transient failures every time, or a process that
  died each time while holding it): JetStream publishes the max-deliveries advisory, which
  carries the stream sequence; the original is fetched by it and copied here. The advisory
  subscription is a queue group, so replicas sharing the consumer copy it once.

The copy keeps the payload byte for byte and its Content-Type; the reason, the original
subject, stream and stream sequence, and the delivery count travel as headers. The copy's
`Nats-Msg-Id` is derived from the stream sequence, so two paths copying the same message
within the DLQ stream's duplicate window store it once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from oo_ml.ingest.counters import IngestCounters

log = logging.getLogger(__name__)

REASON = "Oo-Dlq-Reason"
ORIGINAL_SUBJECT = "Oo-Original-Subject"
ORIGINAL_STREAM = "Oo-Original-Stream"
STREAM_SEQ = "Oo-Stream-Seq"
DELIVERIES = "Oo-Deliveries"
PREFIX = "dlq."
ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"
QUEUE_GROUP = "oo-ml-dlq"

_MAX_REASON = 512


def _header_value(text: str) -> str:
    # Header values are one line; a reason may quote user input.
    return " ".join(text.split())[:_MAX_REASON]


class DeadLetters:
    def __init__(
        self, nc: Client, js: JetStreamContext, counters: IngestCounters, dlq_stream: str
    ) -> None:
        self.nc = nc
        self.js = js
        self.counters = counters
        self.dlq_stream = dlq_stream
        self._subs: list[Subscription] = []

    async def copy(
        self,
        *,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None,
        stream: str,
        stream_seq: int,
        deliveries: int,
        reason: str,
    ) -> None:
        """Publish the copy and wait for the DLQ stream's ack. Raises if it was not stored."""
        out = {
            REASON: _header_value(reason),
            ORIGINAL_SUBJECT: subject,
            ORIGINAL_STREAM: stream,
            STREAM_SEQ: str(stream_seq),
            DELIVERIES: str(deliveries),
            "Nats-Msg-Id": f"dlq:{stream}:{stream_seq}",
        }
        for key, value in (headers or {}).items():
            if key.lower() == "content-type":
                out["Content-Type"] = value
        await self.js.publish(PREFIX + subject, data, headers=out, stream=self.dlq_stream)
        self.counters.dead_lettered += 1
        log.warning(
            "dead-lettered %s #%d (%s) to %s%s: %s",
            stream,
            stream_seq,
            subject,
            PREFIX,
            subject,
            out[REASON],
        )

    async def copy_msg(self, msg: Msg, reason: str) -> None:
        meta = msg.metadata
        await self.copy(
            subject=msg.subject,
            data=msg.data,
            headers=msg.headers,
            stream=meta.stream,
            stream_seq=meta.sequence.stream,
            deliveries=meta.num_delivered,
            reason=reason,
        )

    async def watch(self, stream: str, consumer: str, on_error: Callable[[], None]) -> None:
        """Copy every message of (stream, consumer) that runs out of deliveries."""

        async def handle(msg: Msg) -> None:
            try:
                await self._on_max_deliveries(json.loads(msg.data))
            except Exception:
                # Core NATS will not redeliver an advisory: say loudly which one was missed.
                on_error()
                log.exception("could not dead-letter after max deliveries: %r", msg.data[:512])

        subject = ADVISORY.format(stream=stream, consumer=consumer)
        self._subs.append(await self.nc.subscribe(subject, queue=QUEUE_GROUP, cb=handle))

    async def _on_max_deliveries(self, advisory: dict[str, Any]) -> None:
        stream, seq = str(advisory["stream"]), int(advisory["stream_seq"])
        deliveries = int(advisory.get("deliveries", 0))
        original = await self.js.get_msg(stream, seq)
        await self.copy(
            subject=original.subject or "unknown",
            data=original.data or b"",
            headers=original.headers,
            stream=stream,
            stream_seq=seq,
            deliveries=deliveries,
            reason=f"max deliveries ({deliveries}) reached without success",
        )

    async def close(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()

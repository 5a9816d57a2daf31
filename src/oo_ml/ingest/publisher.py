"""The serve signal: one TipServed envelope per decision, on `signals.tip.served`.

`decision_made` runs on the Score path, right after the decision's commit, so it only puts
the record on a bounded queue; a publisher task drains it in batches. A full queue, a failed
or timed-out publish, or NATS being away costs one counter and one dropped signal, never an
error on Score.

One JetStream ack per batch, not per signal (ADR 0024): every signal but the batch's last is
a core publish without a reply subject, and the last goes through JetStream and waits for
its ack. One connection's messages reach the stream in order, and oo-ml's streams discard
old messages rather than refuse new ones, so on an unbroken connection that ack answers
for the batch; a batch sent across a reconnect is sent again (the ADR lists the cases
where early signals can still be lost). A per-message ack cost the event loop about
0.27 ms per Score under load (nats.py handles each ack reply as its own message), more
than the publish itself. Batches size themselves: while one batch waits for its ack, the
next one queues.

The event_id is derived from the decision id and sent as `Nats-Msg-Id`, so a retried
publish is dropped by the stream's duplicate window and a redelivered one by the ingest's
dedupe table. Our own consumer reads these back from `signals.>`: that is the one place
tip volume is counted (`profile_store` counts a decision once even if the recommender also
reports it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client
from nats.js import JetStreamContext

from oo.events.v1 import envelope_pb2, signals_pb2
from oo_ml.domain.decisions import DecisionRecord
from oo_ml.ingest.counters import IngestCounters
from oo_ml.ingest.decode import CURRENT_SCHEMA_VERSION

log = logging.getLogger(__name__)

SUBJECT = "signals.tip.served"
PRODUCER = "oo-ml"
_BATCH = 256

T = TypeVar("T")


async def _first(a: Coroutine[Any, Any, T], b: Coroutine[Any, Any, Any]) -> T | None:
    """a's result if a finishes first, else None; the other is cancelled."""
    ta, tb = asyncio.ensure_future(a), asyncio.ensure_future(b)
    await asyncio.wait({ta, tb}, return_when=asyncio.FIRST_COMPLETED)
    tb.cancel()
    if ta.done():
        return ta.result()
    ta.cancel()
    return None


def served_event_id(decision_id: str) -> str:
    return f"served-{decision_id}"


def served_envelope(record: DecisionRecord) -> envelope_pb2.Envelope:
    chosen = record.chosen
    ts = Timestamp()
    ts.FromNanoseconds(int(record.created_at * 1e9))
    return envelope_pb2.Envelope(
        event_id=served_event_id(record.decision_id),
        schema_version=CURRENT_SCHEMA_VERSION,
        producer=PRODUCER,
        occurred_at=ts,
        user_id=record.user_id,
        tip_served=signals_pb2.TipServed(
            decision_id=record.decision_id,
            tip_id=chosen.tip_id,
            arm=chosen.arm,
            policy=record.policy,
            feature_version=record.feature_version,
            propensity=chosen.propensity,
            prompt_version=chosen.prompt_version,
            generation_id=chosen.generation_id,
        ),
    )


class ServePublisher:
    """A DecisionListener: queues each decision; `run` publishes them."""

    def __init__(
        self, counters: IngestCounters, max_queue: int = 10_000, ack_timeout_s: float = 5.0
    ) -> None:
        self.counters = counters
        self.ack_timeout_s = ack_timeout_s
        self._queue: asyncio.Queue[DecisionRecord] = asyncio.Queue(maxsize=max_queue)
        self._in_hand = 0

    def decision_made(self, record: DecisionRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.counters.publish_dropped += 1

    @property
    def queued(self) -> int:
        """Serve signals not published yet: queued, or in the batch in hand."""
        return self._queue.qsize() + self._in_hand

    async def run(
        self,
        nc: Client,
        js: JetStreamContext,
        stop: asyncio.Event,
        connected: asyncio.Event,
        drain_s: float = 2.0,
    ) -> None:
        """Publish until stop is set, then what is still queued, for up to drain_s."""
        while not stop.is_set():
            record = await _first(self._queue.get(), stop.wait())
            if not isinstance(record, DecisionRecord):
                break
            batch = [record]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._in_hand = len(batch)
            # Wait for the connection instead of failing fast: the queue is the buffer, and
            # what overflows it is counted as dropped.
            if not connected.is_set():
                await _first(connected.wait(), stop.wait())
                if not connected.is_set():  # stopping while NATS is away
                    self.counters.publish_dropped += len(batch)
                    self._in_hand = 0
                    break
            await self._publish(nc, js, batch)
            self._in_hand = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while not self._queue.empty() and connected.is_set() and loop.time() < deadline:
            batch = []
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._publish(nc, js, batch)
        left = self._queue.qsize()
        if left:
            self.counters.publish_dropped += left
            log.warning("%d serve signals not published at shutdown", left)

    async def _publish(self, nc: Client, js: JetStreamContext, batch: list[DecisionRecord]) -> None:
        try:
            await self._publish_batch(nc, js, batch)
        except Exception:  # a bug here must cost signals, counted, not the publisher task
            self.counters.publish_failed += len(batch)
            log.exception("publishing %d serve signals failed", len(batch))

    async def _publish_batch(
        self, nc: Client, js: JetStreamContext, batch: list[DecisionRecord]
    ) -> None:
        """The batch in order, acknowledged once: by the JetStream ack of its last signal.
        If the connection was re-established meanwhile, signals handed to the dead socket
        may be lost while the last one, resent from nats.py's buffer, is acked: the batch
        is then sent again, once (the stream's duplicate window drops what did land)."""
        for _ in range(2):
            reconnects = nc.stats["reconnects"]
            unsent, error = await self._send(nc, js, batch)
            if error is None and nc.stats["reconnects"] == reconnects:
                self.counters.published += len(batch) - unsent
                self.counters.publish_failed += unsent
                return
            if error is not None:
                break
            log.info("NATS reconnected while %d serve signals were sent: again", len(batch))
        # Unconfirmed, so all counted as failed, though some may be stored. Nothing more is
        # retried: the signal is best effort, and a stored one is counted once anyway
        # (Nats-Msg-Id, then the ingest's dedupe table).
        self.counters.publish_failed += len(batch)
        log.warning(
            "%d serve signals were not acknowledged: %s", len(batch), error or "reconnected"
        )

    async def _send(
        self, nc: Client, js: JetStreamContext, batch: list[DecisionRecord]
    ) -> tuple[int, Exception | None]:
        """All but the last as core publishes, the last through JetStream. Returns how
        many were not handed to the connection, and the last one's error (None: acked)."""
        *rest, last = batch
        unsent = 0
        for record in rest:
            try:
                env = served_envelope(record)
                await nc.publish(
                    SUBJECT, env.SerializeToString(), headers={"Nats-Msg-Id": env.event_id}
                )
            except Exception as e:  # not sent: this one is lost, the rest may still go
                unsent += 1
                log.debug("publish of serve signal %s failed: %s", record.decision_id, e)
        try:
            env = served_envelope(last)
            await js.publish(
                SUBJECT,
                env.SerializeToString(),
                timeout=self.ack_timeout_s,
                headers={"Nats-Msg-Id": env.event_id},
            )
        except Exception as e:
            return unsent, e
        return unsent, None

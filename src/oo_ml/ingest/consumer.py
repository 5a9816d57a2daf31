"""The fetch loop of one durable pull consumer: fetch a batch, apply it, settle each message.

Settling, per message:
- applied, duplicate, stale, unknown kind -> ack (after the batch's commit, never before);
- unparseable or invalid -> copy to the DLQ, then term (never redelivered);
- transient or unexpected failure -> nak with a growing delay; when the deliveries run out,
  the max-deliveries advisory dead-letters it (`dead_letters`).

Acks are fire-and-forget (`ack()`, not `ack_sync()`, five times the throughput): an ack
lost with the connection redelivers an event whose id is already recorded, which the
dedupe table turns into a no-op.

The next batch is fetched and decoded while the previous one is applied (one batch in
flight), which overlaps the network wait and the decoding with the SQLite commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from oo_ml.domain.events import Event, UnknownKind
from oo_ml.errors import BadEvent
from oo_ml.ingest.counters import IngestCounters
from oo_ml.ingest.dead_letters import DeadLetters
from oo_ml.ingest.decode import decode
from oo_ml.ingest.effects import Applier, Outcome, Result

log = logging.getLogger(__name__)

_IDLE_CHECK_S = 10.0  # how long without messages before checking the consumer still exists
_ERROR_PAUSE_S = 0.5
_FAILURE_LOG_EVERY_S = 30.0
_DECODE_SLICE = 32  # messages decoded between two yields to the event loop


@dataclass
class Batch:
    """A fetched batch, decoded and sorted by what happens to each message."""

    msgs: list[Msg]
    events: list[tuple[Msg, Event]] = field(default_factory=list)
    unknown: list[tuple[Msg, UnknownKind]] = field(default_factory=list)
    bad: list[tuple[Msg, str]] = field(default_factory=list)
    failed: list[tuple[Msg, str]] = field(default_factory=list)


class BatchConsumer:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        stream: str,
        durable: str,
        batch: int,
        applier: Applier,
        dead_letters: DeadLetters,
        counters: IngestCounters,
        fetch_timeout_s: float,
        nak_delay_s: float,
        max_nak_delay_s: float,
        on_state: Callable[[bool], None],
        on_lost: Callable[[], Awaitable[None]],
    ) -> None:
        self.js = js
        self.stream = stream
        self.durable = durable
        self.batch = batch
        self.applier = applier
        self.dead_letters = dead_letters
        self.counters = counters
        self.fetch_timeout_s = fetch_timeout_s
        self.nak_delay_s = nak_delay_s
        self.max_nak_delay_s = max_nak_delay_s
        self.on_state = on_state
        self.on_lost = on_lost
        self._warned_kinds: set[str] = set()
        self._last_failure_log = -1e9

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and apply until stop is set; then finish and settle the batch in hand."""
        sub = await self.js.pull_subscribe_bind(self.durable, stream=self.stream)
        inflight: asyncio.Task[None] | None = None
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(self.batch, timeout=self.fetch_timeout_s)
                except TimeoutError:
                    # No messages (or no answer while reconnecting, which the connection's
                    # own state reports). Check now and then that the consumer still exists,
                    # e.g. after a server restarted without its store.
                    self.on_state(True)
                    if time.monotonic() - idle_since > _IDLE_CHECK_S:
                        idle_since = time.monotonic()
                        await self._check_consumer()
                    continue
                except ConnectionClosedError:
                    if stop.is_set():
                        break
                    await self._failed("connection closed")
                    continue
                except Exception as e:
                    await self._failed(f"{type(e).__name__}: {e}")
                    continue
                idle_since = time.monotonic()
                self.on_state(True)
                # Decode this batch while the previous one is being applied.
                batch = await self.prepare(msgs)
                if inflight is not None:
                    await inflight
                inflight = asyncio.create_task(self.handle(batch))
        finally:
            if inflight is not None:
                await inflight
            try:
                await sub.unsubscribe()
            except Exception as e:  # the connection may be gone already; nothing to undo
                log.debug("unsubscribe of %s failed: %s", self.durable, e)

    async def _failed(self, why: str) -> None:
        self.counters.errors += 1
        self.on_state(False)
        # Every failure is counted; while they repeat, one line per 30 s is enough to read.
        now = time.monotonic()
        if now - self._last_failure_log >= _FAILURE_LOG_EVERY_S:
            self._last_failure_log = now
            log.warning("fetch from %s/%s failed: %s", self.stream, self.durable, why)
        await asyncio.sleep(_ERROR_PAUSE_S)

    async def _check_consumer(self) -> None:
        try:
            await self.js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            log.warning("consumer %s/%s is gone: setting it up again", self.stream, self.durable)
            self.on_state(False)
            await self.on_lost()
        except Exception as e:  # unreachable server: the connection callbacks report it
            log.debug("consumer check of %s failed: %s", self.durable, e)

    async def prepare(self, msgs: list[Msg]) -> Batch:
        """Decode a fetched batch (on the event loop, while the previous one is applied)."""
        batch = Batch(msgs)
        for i, msg in enumerate(msgs):
            if i % _DECODE_SLICE == _DECODE_SLICE - 1:
                # Decoding a whole batch takes milliseconds; let Score calls in between.
                await asyncio.sleep(0)
            try:
                decoded = decode(msg.data, msg.headers)
            except BadEvent as e:
                batch.bad.append((msg, e.reason))
                continue
            except Exception as e:  # a decoder bug must not stop the loop: retry, then DLQ
                log.exception("decoding a message on %s failed", msg.subject)
                batch.failed.append((msg, f"{type(e).__name__}: {e}"))
                continue
            if isinstance(decoded, UnknownKind):
                batch.unknown.append((msg, decoded))
            else:
                batch.events.append((msg, decoded))
        return batch

    async def handle(self, batch: Batch) -> None:
        """Apply and settle one batch. Never raises: a failure naks what is unsettled."""
        try:
            await self._handle(batch)
        except Exception:
            self.counters.errors += 1
            log.exception(
                "batch of %d from %s failed; nak'ing what is unsettled",
                len(batch.msgs),
                self.durable,
            )
            for msg in batch.msgs:
                if not msg.is_acked:
                    await self._settle(msg, Result(Outcome.FAILED, "batch failed"))

    async def _handle(self, batch: Batch) -> None:
        for msg, unknown in batch.unknown:
            await self._unknown(msg, unknown)
        for msg, why in batch.failed:
            await self._settle(msg, Result(Outcome.FAILED, why))
        if batch.bad:
            await asyncio.gather(*(self._dead_letter(m, reason) for m, reason in batch.bad))
        if batch.events:
            results = await self.applier.apply([e for _, e in batch.events])
            for (msg, _), result in zip(batch.events, results, strict=True):
                await self._settle(msg, result)

    async def _unknown(self, msg: Msg, decoded: UnknownKind) -> None:
        self.counters.unknown_kind += 1
        kind = decoded.kind or "<none>"
        if kind not in self._warned_kinds:
            self._warned_kinds.add(kind)
            log.warning(
                "payload kind %s on %s is unknown to this build: acked and counted (ADR 0007)",
                kind,
                msg.subject,
            )
        await self._ack(msg)

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        try:
            await self.dead_letters.copy_msg(msg, reason)
        except Exception as e:
            # Not copied, so not terminated: it comes back and the copy is tried again.
            self.counters.errors += 1
            log.warning("dead-letter copy of %s failed (%s): will retry", msg.subject, e)
            await self._nak(msg)
            return
        try:
            await msg.term()
        except Exception as e:
            log.warning("term of a dead-lettered message failed: %s", e)

    async def _settle(self, msg: Msg, result: Result) -> None:
        match result.outcome:
            case Outcome.APPLIED:
                self.counters.applied += 1
                await self._ack(msg)
            case Outcome.DUPLICATE:
                self.counters.duplicates += 1
                await self._ack(msg)
            case Outcome.STALE:
                self.counters.stale += 1
                await self._ack(msg)
            case Outcome.RETRY:
                self.counters.transient_retries += 1
                log.info("transient failure on %s, retrying: %s", msg.subject, result.detail)
                await self._nak(msg)
            case Outcome.FAILED:
                self.counters.errors += 1
                await self._nak(msg)

    def nak_delay(self, deliveries: int) -> float:
        return float(min(self.nak_delay_s * 2 ** max(deliveries - 1, 0), self.max_nak_delay_s))

    async def _ack(self, msg: Msg) -> None:
        try:
            await msg.ack()
        except Exception as e:  # redelivered later, and then a duplicate: harmless
            log.debug("ack failed: %s", e)

    async def _nak(self, msg: Msg) -> None:
        try:
            await msg.nak(delay=self.nak_delay(msg.metadata.num_delivered))
        except Exception as e:  # redelivered after ack_wait instead
            log.debug("nak failed: %s", e)

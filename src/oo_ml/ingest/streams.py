"""Streams and durable consumers: create what is missing, check what an operator made.

Three streams: signals (`signals.>`), feedback (`feedback.>`) and the dead letters
(`dlq.>`). A stream is looked up by our default name, then by subject, so a stream an
operator made under another name (say one `EVENTS` stream over `signals.>` and
`feedback.>`) is used as it is. It is never updated or overwritten: when it cannot serve
(does not capture the whole subject, is sealed, takes no publish acks, or would discard
dead letters at once) setup fails with `IncompatibleStream`, naming the stream and why.

The durable pull consumers (one per input stream) are created or updated on every start,
so a changed OO_INGEST_* setting takes effect. Redelivery of an unacked message (a process
that died or hung holding it) follows `backoff`: ack_wait, then doubling, one entry per
redelivery, so a message that crashes its consumer is not retried in a tight loop.
`backoff` replaces `ack_wait` by its first entry and must be shorter than `max_deliver`.

Measured on nats-server 2.15: with a backoff, `nak(delay=d)` on delivery n redelivers
after d + backoff[n-1] - backoff[0], not d. So transient failures back off along the same
schedule (plus the consumer's own growing delay); tests that retry quickly use a short
ack_wait.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from oo_ml.config import IngestConfig
from oo_ml.errors import IncompatibleStream

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 120.0
_MAX_BACKOFF_S = 3600.0


@dataclass(frozen=True, slots=True)
class StreamSpec:
    name: str  # the name we create it under
    subject: str
    description: str
    max_age_s: float  # for the streams we create; 0 keeps messages forever
    needs_retention: bool = False  # dead letters must stay until someone reads them


SIGNALS = StreamSpec("OO_SIGNALS", "signals.>", "oO signals: tips served, viewed; tasks", 7 * 86400)
FEEDBACK = StreamSpec("OO_FEEDBACK", "feedback.>", "oO feedback on tips", 7 * 86400)
DLQ = StreamSpec("OO_DLQ", "dlq.>", "oO dead letters: dlq.<original subject>", 0, True)
STREAMS = (SIGNALS, FEEDBACK, DLQ)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    stream: StreamSpec
    durable: str


CONSUMERS = (ConsumerSpec(SIGNALS, "oo-ml-signals"), ConsumerSpec(FEEDBACK, "oo-ml-feedback"))


def subject_covers(pattern: str, subject: str) -> bool:
    """True when every subject `subject` matches is also matched by `pattern`."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or s[i] == ">":
            return False
        if token != "*" and token != s[i]:
            return False
    return len(p) == len(s)


def compatibility_problems(config: api.StreamConfig, spec: StreamSpec) -> list[str]:
    problems = []
    subjects = config.subjects or []
    if not any(subject_covers(s, spec.subject) for s in subjects):
        problems.append(f"its subjects {subjects} do not capture all of {spec.subject!r}")
    if config.sealed:
        problems.append("it is sealed")
    if config.no_ack:
        problems.append("it sends no publish acks (no_ack), so nothing published is confirmed")
    if spec.needs_retention and config.retention == api.RetentionPolicy.INTEREST:
        problems.append("interest retention would discard dead letters nobody consumes yet")
    return problems


async def _info(js: JetStreamContext, name: str) -> api.StreamInfo | None:
    try:
        info: api.StreamInfo = await js.stream_info(name)
    except NotFoundError:
        return None
    return info


async def ensure_stream(js: JetStreamContext, spec: StreamSpec) -> str:
    """The name of the stream serving spec.subject, created if none exists."""
    info = await _info(js, spec.name)
    if info is None:
        try:
            other = await js.find_stream_name_by_subject(spec.subject)
        except NotFoundError:
            other = None
        if other:
            info = await _info(js, other)
    if info is None:
        config = api.StreamConfig(
            name=spec.name,
            description=spec.description,
            subjects=[spec.subject],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=spec.max_age_s or None,
            duplicate_window=DUPLICATE_WINDOW_S,
        )
        try:
            await js.add_stream(config)
        except BadRequestError as e:
            # Another replica may have created it a moment ago; anything else is a conflict.
            info = await _info(js, spec.name)
            if info is None:
                raise IncompatibleStream(
                    f"cannot create stream {spec.name} for {spec.subject!r}: {e.description}"
                ) from e
        else:
            log.info("created stream %s for %s", spec.name, spec.subject)
            return spec.name
    name = info.config.name or spec.name
    problems = compatibility_problems(info.config, spec)
    if problems:
        raise IncompatibleStream(
            f"stream {name} exists but cannot serve {spec.subject!r}: {'; '.join(problems)}."
            " It is left unchanged: fix or remove it, or point OO_NATS_URL elsewhere."
        )
    return name


def backoff_schedule(ack_wait_s: float, max_deliver: int) -> list[float]:
    """One wait per redelivery: ack_wait, then doubling (len < max_deliver, as required)."""
    return [min(ack_wait_s * 2**i, _MAX_BACKOFF_S) for i in range(max(max_deliver - 1, 1))]


def consumer_config(spec: ConsumerSpec, cfg: IngestConfig) -> api.ConsumerConfig:
    backoff = backoff_schedule(cfg.ack_wait_s, cfg.max_deliver)
    return api.ConsumerConfig(
        name=spec.durable,
        durable_name=spec.durable,
        description=f"oo-ml ingest of {spec.stream.subject}",
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=backoff[0],
        backoff=backoff,
        max_deliver=cfg.max_deliver,
        filter_subject=spec.stream.subject,
        # Two batches in flight (one applied while the next is fetched), with room to spare.
        max_ack_pending=max(1000, 4 * cfg.batch),
    )


async def ensure_consumer(
    js: JetStreamContext, stream: str, spec: ConsumerSpec, cfg: IngestConfig
) -> api.ConsumerInfo:
    """Create or update the durable pull consumer."""
    try:
        info: api.ConsumerInfo = await js.add_consumer(stream, consumer_config(spec, cfg))
    except BadRequestError as e:
        raise IncompatibleStream(
            f"cannot create or update consumer {spec.durable} on stream {stream}: {e.description}"
        ) from e
    return info


@dataclass(frozen=True, slots=True)
class Topology:
    """The stream names in use (ours, or an operator's) for each spec."""

    streams: dict[str, str]  # spec name -> actual stream name

    def stream_of(self, spec: StreamSpec) -> str:
        return self.streams[spec.name]


async def ensure_topology(js: JetStreamContext, cfg: IngestConfig) -> Topology:
    streams = {spec.name: await ensure_stream(js, spec) for spec in STREAMS}
    for c in CONSUMERS:
        await ensure_consumer(js, streams[c.stream.name], c, cfg)
    return Topology(streams)

"""The ingest's counters, read by tests and by Stats. Plain ints: one event loop writes them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class IngestCounters:
    applied: int = 0
    """Events that took effect (their event_id is now recorded)."""
    duplicates: int = 0
    """Events whose event_id had already taken effect: acked, nothing changed."""
    stale: int = 0
    """Events older than the dedupe window: acked without effect (see `effects`)."""
    dead_lettered: int = 0
    """Messages copied to `dlq.<subject>`: undecodable, invalid, or out of deliveries."""
    unknown_kind: int = 0
    """Valid envelopes whose payload this build does not handle: acked (ADR 0007)."""
    transient_retries: int = 0
    """Messages nak'ed with a delay after a transient failure."""
    errors: int = 0
    """Unexpected failures (a bug or a lost connection): logged, nak'ed, counted."""
    rewards_applied: int = 0
    """TipFeedback events whose reward changed the policy."""
    rewards_rejected: int = 0
    """TipFeedback events naming an unknown or expired decision: recorded, not rewarded."""
    published: int = 0
    """TipServed events acknowledged by JetStream."""
    publish_failed: int = 0
    """TipServed events whose publish failed or timed out: dropped."""
    publish_dropped: int = 0
    """TipServed events dropped because the publish queue was full."""

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

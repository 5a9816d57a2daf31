"""Applying a batch of decoded events: reward joins first, then one durable transaction.

Exactly-once without a distributed transaction: `engine.reward` is itself idempotent per
decision (a second reward answers applied=False), so a TipFeedback is applied as

    1. engine.reward(decision_id, r)          its own commit, idempotent
    2. one SqliteDB.run for the whole batch:  record each event_id + its profile effects

and only then is the message acked. A crash between 1 and 2 redelivers the message; the
reward answers applied=False and step 2 records the event once. A crash after 2 but
before the ack redelivers an event whose id is recorded: a duplicate, acked unchanged.

Rewards are not retried for events already recorded (checked before step 1), run
concurrently within a batch (the store's group commit then shares one fsync), and an
unknown or expired decision (NotFound / FailedPrecondition) still records the event: it
is valid, only late or stray, and redelivering it could never succeed.

An event older than the dedupe window is acked without effect (`stale`): its id may have
been applied and already forgotten, and exactly-once matters more than a late count.

The reward is the action's value alone (completed 1, dismissed 0, snoozed
OO_SNOOZED_REWARD). Dwell does not shape it: it feeds the profile's mean dwell, which
feature version v2 gives the policies as context, so no second, hand-tuned reward signal
competes with what the policies learn from it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from oo_ml.config import IngestConfig
from oo_ml.domain.engine import RewardResult
from oo_ml.domain.events import Action, Event, TipFeedback
from oo_ml.domain.ports import ProfileStore
from oo_ml.errors import FailedPrecondition, NotFound, Unavailable
from oo_ml.ingest.counters import IngestCounters

log = logging.getLogger(__name__)

# Failures a retry may fix: a store could not commit or was busy (TransientStoreError is
# an Unavailable; every store adapter raises its own such failures as one).
TRANSIENT: tuple[type[BaseException], ...] = (Unavailable,)

_REWARD_CONCURRENCY = 64


class Rewarder(Protocol):
    """What ingest needs of the engine for TipFeedback (ScoringEngine satisfies it)."""

    async def reward(self, decision_id: str, reward: float) -> RewardResult: ...


class Outcome(enum.Enum):
    APPLIED = "applied"  # took effect now: ack
    DUPLICATE = "duplicate"  # took effect before: ack
    STALE = "stale"  # older than the dedupe window: ack, no effect
    RETRY = "retry"  # transient failure: nak with a delay
    FAILED = "failed"  # unexpected failure: nak with a delay, counted as an error


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    detail: str = ""


def reward_of(action: Action, snoozed_reward: float) -> float:
    if action is Action.COMPLETED:
        return 1.0
    if action is Action.DISMISSED:
        return 0.0
    return snoozed_reward


class Applier:
    def __init__(
        self,
        profiles: ProfileStore,
        rewarder: Rewarder,
        config: IngestConfig,
        counters: IngestCounters,
        clock: Callable[[], float],
    ) -> None:
        self.profiles = profiles
        self.rewarder = rewarder
        self.config = config
        self.counters = counters
        self.clock = clock
        self._reward_slots = asyncio.Semaphore(_REWARD_CONCURRENCY)

    async def apply(self, events: Sequence[Event]) -> list[Result]:
        """One Result per event, in order. Never raises for a single bad event."""
        now = self.clock()
        results: list[Result | None] = [None] * len(events)
        cutoff = now - self.config.dedupe_window_s
        for i, e in enumerate(events):
            if e.occurred_at < cutoff:
                results[i] = Result(Outcome.STALE)
        await self._rewards(events, results)

        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            try:
                fresh = await self.profiles.record([events[i] for i in todo], self.clock())
            except TRANSIENT as e:
                for i in todo:
                    results[i] = Result(Outcome.RETRY, f"store: {e}")
            except Exception:
                # Something in the batch is broken: apply one by one, so one event cannot
                # hold back the others, and the broken one shows in the log and counters.
                log.exception("batch of %d events failed; applying them one by one", len(todo))
                for i in todo:
                    results[i] = await self._record_one(events[i])
            else:
                for i, took_effect in zip(todo, fresh, strict=True):
                    results[i] = Result(Outcome.APPLIED if took_effect else Outcome.DUPLICATE)
        return [r if r is not None else Result(Outcome.FAILED, "no result") for r in results]

    async def _record_one(self, event: Event) -> Result:
        try:
            fresh = await self.profiles.record([event], self.clock())
        except TRANSIENT as e:
            return Result(Outcome.RETRY, f"store: {e}")
        except Exception as e:
            log.exception("event %s (%s) failed", event.event_id, event.kind)
            return Result(Outcome.FAILED, f"{type(e).__name__}: {e}")
        return Result(Outcome.APPLIED if fresh[0] else Outcome.DUPLICATE)

    async def _rewards(self, events: Sequence[Event], results: list[Result | None]) -> None:
        pending = [
            i
            for i, e in enumerate(events)
            if results[i] is None and isinstance(e.payload, TipFeedback)
        ]
        if not pending:
            return
        try:
            done = await self.profiles.applied_among([events[i].event_id for i in pending])
        except TRANSIENT as e:
            for i in pending:
                results[i] = Result(Outcome.RETRY, f"store: {e}")
            return
        first: dict[str, int] = {}
        for i in pending:
            event_id = events[i].event_id
            if event_id in done or event_id in first:
                continue  # step 2 will see it as a duplicate; no second reward call
            first[event_id] = i

        async def one(i: int) -> None:
            e = events[i]
            assert isinstance(e.payload, TipFeedback)
            value = reward_of(e.payload.action, self.config.snoozed_reward)
            async with self._reward_slots:
                try:
                    r = await self.rewarder.reward(e.payload.decision_id, value)
                except (NotFound, FailedPrecondition) as err:
                    self.counters.rewards_rejected += 1
                    log.debug("feedback %s not rewarded: %s", e.event_id, err)
                except TRANSIENT as err:
                    results[i] = Result(Outcome.RETRY, f"reward: {err}")
                except Exception as err:
                    log.exception("reward of %s failed", e.payload.decision_id)
                    results[i] = Result(Outcome.FAILED, f"reward: {type(err).__name__}: {err}")
                else:
                    self.counters.rewards_applied += int(r.applied)

        await asyncio.gather(*(one(i) for i in first.values()))
        # A copy of an event in the same batch shares its first occurrence's fate: recording
        # the copy while the original is retried would lose the reward for good.
        for i in pending:
            j = first.get(events[i].event_id)
            if j is not None and j != i and results[j] is not None:
                results[i] = results[j]

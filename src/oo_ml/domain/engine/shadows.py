"""Shadow policies: scored after the served answer, learning from the served policy's
rewards, with an off-policy value estimate accumulated per rewarded sample.

A shadow never changes what the user sees, and never slows it down:

- Score only offers the decision to a bounded queue; a full queue drops it and counts it.
- One worker scores the queue. Its share of the event loop is capped by a token bucket
  (`OO_SHADOW_CPU_SHARE`): past it, the worker waits for the bucket to refill, the queue
  fills, and what no longer fits is dropped and counted instead of taking time from Score.
  Off-policy estimates need a sample of the traffic, not all of it; `dropped` says how
  much was skipped.
- A shadow's view of a decision (its choice, its propensities and its model's estimates for
  every logged candidate) goes to the decision log as a row of its own (`AttachShadows`),
  riding the same group commit as the decisions.

When that decision is rewarded, the shadow's model learns from the served policy's data
(without counting the pull as its own) and the sample's IPS and DR terms are added to the
(served, shadow) accumulators that `Stats.shadows` reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from oo_ml.domain.decisions import DecisionRecord, ShadowView
from oo_ml.domain.engine.decision_log import DecisionLog
from oo_ml.domain.engine.models import Models, fit
from oo_ml.domain.features import FEATURE_VERSIONS, Assembled, Vector
from oo_ml.domain.ope import sample_terms
from oo_ml.domain.policies import Policy, estimates
from oo_ml.domain.ports import AddOffPolicy, AttachShadows, PutState, Write
from oo_ml.domain.rng import rng_for

log = logging.getLogger(__name__)

# Longest burst of shadow work the bucket allows, in seconds of loop time.
_BURST_S = 0.05


@dataclass
class ShadowCounters:
    offered: int = 0
    scored: int = 0
    dropped_full: int = 0
    failures: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_full


class Shadows:
    def __init__(
        self,
        policies: Mapping[str, Policy],
        names: Sequence[str],
        models: Models,
        decisions: DecisionLog,
        *,
        queue_size: int = 10_000,
        cpu_share: float = 0.1,
    ) -> None:
        self.policies = policies
        self.names = tuple(names)
        self.models = models
        self.decisions = decisions
        self.cpu_share = cpu_share
        self.counters = ShadowCounters()
        self._queue: asyncio.Queue[tuple[DecisionRecord, Assembled, tuple[Policy, ...]]] = (
            asyncio.Queue(maxsize=queue_size)
        )
        self._tokens = _BURST_S
        self._refilled = time.perf_counter()
        self._worker: asyncio.Task[None] | None = None

    def of(self, served: str) -> tuple[Policy, ...]:
        """The shadows behind a served policy (every configured one but itself)."""
        return tuple(self.policies[s] for s in self.names if s != served)

    def offer(self, record: DecisionRecord, assembled: Assembled) -> None:
        """Queue a served decision for its shadows; never waits."""
        shadows = self.of(record.policy)
        if not shadows:
            return
        self.counters.offered += 1
        try:
            self._queue.put_nowait((record, assembled, shadows))
        except asyncio.QueueFull:
            self.counters.dropped_full += 1
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="oo-shadows")

    async def _work(self) -> None:
        while not self._queue.empty():
            if not self._spend():
                # Over the budget: wait for the bucket to refill instead of dropping what
                # is queued (the queue's bound drops, counted, when Score outpaces us).
                await asyncio.sleep(-self._tokens / self.cpu_share + 0.001)
                continue
            record, assembled, shadows = self._queue.get_nowait()
            try:
                started = time.perf_counter()
                await self.score(record, assembled, shadows)
                self._tokens -= time.perf_counter() - started
                self.counters.scored += 1
            except Exception:
                self.counters.failures += 1
                log.exception("shadow scoring of %s failed", record.decision_id)
            finally:
                self._queue.task_done()
            # Score calls go first: one shadow decision at a time between them.
            await asyncio.sleep(0)

    def _spend(self) -> bool:
        """Whether the bucket allows more shadow work now (refilled at cpu_share)."""
        now = time.perf_counter()
        self._tokens = min(_BURST_S, self._tokens + (now - self._refilled) * self.cpu_share)
        self._refilled = now
        return self._tokens > 0

    async def drain(self) -> None:
        """Until every queued decision is scored or dropped."""
        await self._queue.join()

    async def score(
        self, record: DecisionRecord, assembled: Assembled, shadows: Sequence[Policy]
    ) -> None:
        """Each shadow's view of a served decision, logged beside it."""
        arms = [c.arm for c in record.candidates]
        views = []
        vectors: dict[str, Vector] = {}
        for shadow in shadows:
            x = FEATURE_VERSIONS[shadow.feature_version].vectorise(assembled)
            if shadow.feature_version != record.feature_version:
                vectors[shadow.feature_version] = x
            state = await self.models.for_scoring(record.user_id, shadow, arms)
            sel = shadow.select(state, x, arms, rng_for(record.decision_id, shadow.name))
            views.append(
                ShadowView(
                    policy=shadow.name,
                    chosen_arm=arms[sel.chosen],
                    logged_arm_propensity=sel.propensities[record.chosen_index],
                    propensities=sel.propensities,
                    estimates=tuple(estimates(state, x, arms).tolist()),
                )
            )
        self.decisions.attach_shadows(AttachShadows(record.decision_id, tuple(views), vectors))

    async def reward_writes(self, record: DecisionRecord, reward: float) -> list[Write]:
        """The shadows' learning and off-policy samples for a rewarded decision."""
        arm = record.chosen.arm
        writes: list[Write] = []
        for view in record.shadows:
            shadow = self.policies.get(view.policy)
            if shadow is None:
                continue
            revision, state = await self.models.load(record.user_id, shadow)
            state = self.models.with_arms(state, shadow.name, [arm])
            x = record.shadow_vectors.get(shadow.feature_version, record.x)
            # Learn from the served policy's data without counting it as the shadow's pull.
            model = state.arms[arm].learn(fit(x, state.dim), reward)
            model = replace(
                model, rewarded=state.arms[arm].rewarded, reward_sum=state.arms[arm].reward_sum
            )
            state = replace(state, arms={**state.arms, arm: model})
            writes.append(PutState(record.user_id, shadow.name, revision, state))
            writes.append(off_policy_sample(record, view, reward))
        return writes


def off_policy_sample(record: DecisionRecord, view: ShadowView, reward: float) -> AddOffPolicy:
    weight, dr = sample_terms(
        view.propensities, view.estimates, record.chosen_index, record.chosen.propensity, reward
    )
    return AddOffPolicy(record.policy, view.policy, weight, reward, dr)

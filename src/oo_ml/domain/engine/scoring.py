"""The scoring engine: Score, Reward, Stats and Reset over the policies and the store.

It decides; handlers translate and stores persist. Updates to one user are serialised by
a per-user asyncio lock (no global lock), and every write goes through the store's
atomic commit with compare-and-set on the state revision, so a second replica sharing the
store would retry instead of losing an update.

Background work (`run_background`): the sweeper gives decisions left unrewarded past the
window their default reward, and the population priors are refreshed from the users'
models. Shadow policies are scored after the answer, off the critical path, and learn
from the served policy's rewards; their off-policy value is accumulated per sample.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from oo_ml.config import ScoringConfig
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate, ShadowView
from oo_ml.domain.features import (
    FEATURE_VERSIONS,
    Assembled,
    FeatureStore,
    Inputs,
    Vector,
    assemble,
)
from oo_ml.domain.ope import OffPolicyEstimate, from_sums, sample_terms
from oo_ml.domain.policies import Policy, build_policies, estimates
from oo_ml.domain.state import PolicyState, empty_state, population_prior
from oo_ml.errors import FailedPrecondition, NotFound, Unavailable, UnknownPolicy
from oo_ml.stores.codec import decode_decision, decode_state, encode_decision, encode_state
from oo_ml.stores.ports import (
    AddOffPolicy,
    Conflict,
    GenerationRecord,
    InsertDecision,
    MarkRewarded,
    OffPolicyTotals,
    PutState,
    ReplaceDecisionData,
    Store,
    Write,
)

log = logging.getLogger(__name__)

_CAS_ATTEMPTS = 8
# The most recently updated states a prior is computed from, per policy.
_PRIOR_SAMPLE = 2000
_SWEEP_BATCH = 500
_SWEEP_CONCURRENCY = 32
# The prompt-version bucket of curated fallback tips.
FALLBACK_BUCKET = "fallback"


def rng_for(decision_id: str, salt: str = "") -> np.random.Generator:
    """The decision's RNG: the same id (and salt) always gives the same draws."""
    seed = int.from_bytes(hashlib.blake2b(f"{salt}:{decision_id}".encode(), digest_size=8).digest())
    return np.random.default_rng(seed)


@dataclass(frozen=True, slots=True)
class Candidate:
    tip_id: str
    arm: str
    generation_id: str = ""
    prompt_version: str = ""


@dataclass(frozen=True, slots=True)
class ScoreCommand:
    user_id: str
    candidates: tuple[Candidate, ...]
    inputs: Inputs
    policy: str = ""


@dataclass(frozen=True, slots=True)
class ScoreResult:
    record: DecisionRecord
    features: Assembled

    def ranking(self) -> list[LoggedCandidate]:
        """Candidates best first: the chosen one, then by score."""
        chosen = self.record.chosen
        rest = [c for i, c in enumerate(self.record.candidates) if i != self.record.chosen_index]
        return [chosen, *sorted(rest, key=lambda c: -c.score)]


@dataclass(frozen=True, slots=True)
class RewardResult:
    applied: bool
    policy: str
    arm: str


@dataclass(frozen=True, slots=True)
class ArmReport:
    arm: str
    pulls: int
    rewarded: int
    reward_sum: float
    estimate: float

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rewarded if self.rewarded else 0.0


@dataclass(frozen=True, slots=True)
class PromptReport:
    prompt_version: str
    served: int
    rewarded: int
    reward_sum: float

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rewarded if self.rewarded else 0.0


@dataclass(frozen=True, slots=True)
class StatsReport:
    user_id: str
    policy: str
    feature_version: str
    decisions: int
    arms: list[ArmReport]
    prompts: list[PromptReport]
    shadows: list[OffPolicyEstimate]
    features: Assembled
    users: int
    pending: int

    @property
    def rewarded(self) -> int:
        return sum(a.rewarded for a in self.arms)

    @property
    def reward_sum(self) -> float:
        return sum(a.reward_sum for a in self.arms)

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rewarded if self.rewarded else 0.0


class DecisionListener(Protocol):
    """Told of every logged decision, after the commit. Must not block (ingest publishes)."""

    def decision_made(self, record: DecisionRecord) -> None: ...


class ScoringEngine:
    def __init__(
        self,
        config: ScoringConfig,
        store: Store,
        features: FeatureStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.features = features
        self.clock = clock
        self.policies: dict[str, Policy] = build_policies(config)
        for name in (config.default_policy, *config.shadow_policies):
            self.policy(name)  # fail at start-up, not at the first request
        self.listeners: list[DecisionListener] = []
        self._priors: dict[str, PolicyState] = {}
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.background_failures = 0

    # -- policies and state -------------------------------------------------------------

    def policy(self, name: str) -> Policy:
        """The named policy; an empty name is the default policy."""
        resolved = name or self.config.default_policy
        try:
            return self.policies[resolved]
        except KeyError:
            raise UnknownPolicy(resolved, list(self.policies)) from None

    def shadows_of(self, served: str) -> list[Policy]:
        return [self.policies[s] for s in self.config.shadow_policies if s != served]

    @property
    def users_locked(self) -> int:
        """Users with an update in flight or waiting (a gauge for operators)."""
        return len(self._locks)

    @asynccontextmanager
    async def _user_lock(self, user_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(user_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[user_id]

    async def _load(self, user_id: str, policy: Policy) -> tuple[int, PolicyState]:
        fv = FEATURE_VERSIONS[policy.feature_version]
        stored = await self.store.get(user_id, policy.name)
        if stored is None:
            return 0, empty_state(policy.name, fv.name, fv.dim, self.config.ridge_lambda)
        state = decode_state(stored.data)
        if state.dim < fv.dim:
            # The policy moved to a larger feature version: keep what was learned (ADR 0005).
            state = state.migrated(fv.name, fv.dim)
        return stored.revision, state

    @staticmethod
    def _fit(x: Vector, dim: int) -> Vector:
        return x if x.shape[0] == dim else np.concatenate([x, np.zeros(dim - x.shape[0])])

    async def assemble(self, user_id: str, inputs: Inputs) -> Assembled:
        """The request's values, completed from the stores and the contracts' fallbacks."""
        now = self.clock()
        stored = await self.features.stored_features(user_id, now, inputs.timezone)
        return assemble(inputs, stored, now)

    # -- Score ----------------------------------------------------------------------------

    async def score(self, cmd: ScoreCommand) -> ScoreResult:
        policy = self.policy(cmd.policy)
        assembled = await self.assemble(cmd.user_id, cmd.inputs)
        now = assembled.now
        x = FEATURE_VERSIONS[policy.feature_version].vectorise(assembled)
        candidates = await self._attributed(cmd.candidates)
        arms = [c.arm for c in candidates]
        decision_id = uuid.uuid4().hex
        async with self._user_lock(cmd.user_id):
            for _ in range(_CAS_ATTEMPTS):
                revision, state = await self._load(cmd.user_id, policy)
                state = state.with_arms(arms, self._priors.get(policy.name), self.config.max_arms)
                sel = policy.select(state, x, arms, rng_for(decision_id))
                record = DecisionRecord(
                    decision_id=decision_id,
                    user_id=cmd.user_id,
                    policy=policy.name,
                    feature_version=policy.feature_version,
                    x=x,
                    candidates=tuple(
                        LoggedCandidate(
                            c.tip_id,
                            c.arm,
                            sel.scores[i],
                            sel.propensities[i],
                            c.generation_id,
                            c.prompt_version,
                        )
                        for i, c in enumerate(candidates)
                    ),
                    chosen_index=sel.chosen,
                    explored=sel.explored,
                    created_at=now,
                )
                chosen = record.chosen
                writes: list[Write] = [
                    PutState(
                        cmd.user_id, policy.name, revision, encode_state(state.chose(chosen.arm))
                    ),
                    InsertDecision(
                        decision_id,
                        cmd.user_id,
                        policy.name,
                        now,
                        chosen.arm,
                        chosen.prompt_version,
                        encode_decision(record),
                    ),
                ]
                try:
                    await self.store.commit(writes)
                    break
                except Conflict:
                    continue  # another writer moved the state: decide again on the new one
            else:
                raise Unavailable(f"state of {cmd.user_id!r} kept changing; try again")
        for listener in self.listeners:
            listener.decision_made(record)
        shadows = self.shadows_of(policy.name)
        if shadows:
            self._spawn(self._score_shadows(record, assembled, shadows))
        return ScoreResult(record=record, features=assembled)

    async def _attributed(self, candidates: tuple[Candidate, ...]) -> tuple[Candidate, ...]:
        """Give generated candidates the prompt version the server logged for them: the
        server's record beats the client's label, and curated fallbacks get their own
        bucket so they do not blur the comparison of prompt variants."""
        ids = [c.generation_id for c in candidates if c.generation_id]
        if not ids:
            return candidates
        known = await self.store.generations(ids)

        def attributed(c: Candidate) -> Candidate:
            g = known.get(c.generation_id)
            if g is None:
                return c
            return replace(c, prompt_version=FALLBACK_BUCKET if g.fallback else g.prompt_version)

        return tuple(attributed(c) for c in candidates)

    async def record_generation(self, record: GenerationRecord) -> None:
        await self.store.record_generation(record)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.background_failures += 1
            log.error("background task failed", exc_info=task.exception())

    async def _score_shadows(
        self, record: DecisionRecord, assembled: Assembled, shadows: list[Policy]
    ) -> None:
        arms = [c.arm for c in record.candidates]
        views = []
        vectors: dict[str, Vector] = {}
        for shadow in shadows:
            x = FEATURE_VERSIONS[shadow.feature_version].vectorise(assembled)
            if shadow.feature_version != record.feature_version:
                vectors[shadow.feature_version] = x
            _, state = await self._load(record.user_id, shadow)
            state = state.with_arms(arms, self._priors.get(shadow.name), self.config.max_arms)
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
        updated = replace(record, shadows=tuple(views), shadow_vectors=vectors)
        await self.store.commit([ReplaceDecisionData(record.decision_id, encode_decision(updated))])

    async def drain(self) -> None:
        """Wait for the shadow scoring still in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- Reward ---------------------------------------------------------------------------

    async def reward(
        self, decision_id: str, reward: float, *, source: str = "explicit", now: float | None = None
    ) -> RewardResult:
        """Apply a reward to a logged decision, once. A second reward changes nothing."""
        now = self.clock() if now is None else now
        first = await self.store.get_decision(decision_id)
        if first is None:
            raise NotFound(f"decision {decision_id!r} not found")
        record = decode_decision(first.data)
        if first.reward.reward is not None:
            return RewardResult(False, record.policy, record.chosen.arm)
        if source == "explicit" and now - record.created_at > self.config.reward_window_s:
            raise FailedPrecondition(
                f"decision {decision_id!r} is {now - record.created_at:.0f}s old; rewards are accepted"
                f" for {self.config.reward_window_s:.0f}s"
            )
        async with self._user_lock(record.user_id):
            for _ in range(_CAS_ATTEMPTS):
                current = await self.store.get_decision(decision_id)
                if current is None:
                    raise NotFound(f"decision {decision_id!r} not found (the user was reset)")
                if current.reward.reward is not None:
                    return RewardResult(False, record.policy, record.chosen.arm)
                # Re-read: the shadows' views may have been attached since.
                record = decode_decision(current.data)
                writes = await self._reward_writes(record, reward, now, source)
                try:
                    await self.store.commit(writes)
                    return RewardResult(True, record.policy, record.chosen.arm)
                except Conflict:
                    continue
        raise Unavailable(f"state of {record.user_id!r} kept changing; try again")

    async def _reward_writes(
        self, record: DecisionRecord, reward: float, now: float, source: str
    ) -> list[Write]:
        arm = record.chosen.arm
        served = self.policies.get(record.policy)
        writes: list[Write] = [MarkRewarded(record.decision_id, reward, now, source)]
        if served is not None:
            revision, state = await self._load(record.user_id, served)
            state = state.with_arms([arm], self._priors.get(served.name), self.config.max_arms)
            learned = state.learned(arm, self._fit(record.x, state.dim), reward)
            writes.append(PutState(record.user_id, served.name, revision, encode_state(learned)))
        for view in record.shadows:
            shadow = self.policies.get(view.policy)
            if shadow is None:
                continue
            revision, state = await self._load(record.user_id, shadow)
            state = state.with_arms([arm], self._priors.get(shadow.name), self.config.max_arms)
            x = record.shadow_vectors.get(shadow.feature_version, record.x)
            # Learn from the served policy's data without counting it as the shadow's pull.
            model = state.arms[arm].learn(self._fit(x, state.dim), reward)
            model = replace(
                model, rewarded=state.arms[arm].rewarded, reward_sum=state.arms[arm].reward_sum
            )
            state = replace(state, arms={**state.arms, arm: model})
            writes.append(PutState(record.user_id, shadow.name, revision, encode_state(state)))
            writes.append(self._off_policy_sample(record, view, reward))
        return writes

    @staticmethod
    def _off_policy_sample(record: DecisionRecord, view: ShadowView, reward: float) -> AddOffPolicy:
        weight, dr = sample_terms(
            view.propensities, view.estimates, record.chosen_index, record.chosen.propensity, reward
        )
        return AddOffPolicy(record.policy, view.policy, weight, reward, dr)

    # -- Stats and Reset ------------------------------------------------------------------

    async def stats(self, user_id: str, policy_name: str) -> StatsReport:
        policy = self.policy(policy_name)
        fv = FEATURE_VERSIONS[policy.feature_version]
        now = self.clock()
        stored = await self.features.stored_features(user_id, now) if user_id else {}
        assembled = assemble(Inputs({}), stored, now)
        x = fv.vectorise(assembled)
        shadows = [self._shadow_report(t) for t in await self.store.off_policy_totals(policy.name)]
        if user_id:
            _, state = await self._load(user_id, policy)
            arms = [
                ArmReport(
                    a, m.pulls, m.rewarded, m.reward_sum, float(m.theta @ self._fit(x, state.dim))
                )
                for a, m in sorted(state.arms.items())
            ]
            prompts = await self.store.prompt_totals(policy.name, user_id)
            return StatsReport(
                user_id=user_id,
                policy=policy.name,
                feature_version=state.feature_version,
                decisions=state.decisions,
                arms=arms,
                prompts=[
                    PromptReport(p.prompt_version, p.served, p.rewarded, p.reward_sum)
                    for p in prompts
                ],
                shadows=shadows,
                features=assembled,
                users=1 if state.decisions else 0,
                pending=await self.store.pending_count(user_id, policy.name),
            )
        totals = await self.store.policy_totals(policy.name)
        prior = self._priors.get(policy.name)
        arms = [
            ArmReport(
                t.arm,
                t.pulls,
                t.rewarded,
                t.reward_sum,
                float(prior.arms[t.arm].theta @ x) if prior and t.arm in prior.arms else 0.0,
            )
            for t in totals.arms
        ]
        prompts = await self.store.prompt_totals(policy.name, None)
        return StatsReport(
            user_id="",
            policy=policy.name,
            feature_version=fv.name,
            decisions=sum(a.pulls for a in arms),
            arms=arms,
            prompts=[
                PromptReport(p.prompt_version, p.served, p.rewarded, p.reward_sum) for p in prompts
            ],
            shadows=shadows,
            features=assembled,
            users=totals.users,
            pending=totals.pending,
        )

    @staticmethod
    def _shadow_report(t: OffPolicyTotals) -> OffPolicyEstimate:
        return from_sums(
            t.shadow,
            t.n,
            weight_sum=t.weight_sum,
            weighted_reward_sum=t.weighted_reward_sum,
            dr_sum=t.dr_sum,
            dr_sq_sum=t.dr_sq_sum,
            reward_sum=t.reward_sum,
        )

    async def reset(self, user_id: str) -> tuple[int, int]:
        async with self._user_lock(user_id):
            return await self.store.reset_user(user_id)

    # -- background -----------------------------------------------------------------------

    async def sweep_once(self, now: float | None = None) -> int:
        """Give decisions unrewarded past the window the default reward. Returns how many.
        Rewards run concurrently (bounded), so their commits share fsyncs."""
        default = self.config.default_reward
        if default is None:
            return 0
        now = self.clock() if now is None else now
        slots = asyncio.Semaphore(_SWEEP_CONCURRENCY)

        async def give(decision_id: str) -> bool:
            async with slots:
                try:
                    return (
                        await self.reward(decision_id, default, source="default", now=now)
                    ).applied
                except NotFound:  # reset meanwhile
                    return False

        applied = 0
        while True:
            ids = await self.store.pending_before(now - self.config.reward_window_s, _SWEEP_BATCH)
            applied += sum(await asyncio.gather(*(give(d) for d in ids)))
            if len(ids) < _SWEEP_BATCH:
                return applied

    async def refresh_priors(self) -> None:
        """Recompute each policy's population prior: per arm, the mean of the users' theta
        weighted by how many rewards each user's arm has learned from. Decoding runs on a
        worker thread so the event loop keeps answering Score meanwhile."""
        for policy in self.policies.values():
            blobs = await self.store.policy_states(policy.name, _PRIOR_SAMPLE)
            if blobs:
                prior = await asyncio.to_thread(self._prior_of, policy, blobs)
                if prior is not None:
                    self._priors[policy.name] = prior

    def _prior_of(self, policy: Policy, blobs: list[bytes]) -> PolicyState | None:
        fv = FEATURE_VERSIONS[policy.feature_version]
        states = (decode_state(blob) for blob in blobs)
        return population_prior(
            (st if st.dim == fv.dim else st.migrated(fv.name, fv.dim) for st in states),
            policy.name,
            fv.name,
            fv.dim,
            self.config.ridge_lambda,
        )

    async def run_background(self, stop: asyncio.Event) -> None:
        """The sweeper and the prior refresh, until stop is set. A failing round is logged
        and counted, and the loop goes on: one bad round must not end learning."""
        next_sweep = next_prior = 0.0
        while not stop.is_set():
            t = time.monotonic()
            try:
                if t >= next_prior:
                    await self.refresh_priors()
                    next_prior = t + self.config.prior_refresh_s
                if t >= next_sweep:
                    await self.sweep_once()
                    await self.store.prune_decisions(
                        self.clock() - self.config.decision_retention_s
                    )
                    next_sweep = t + self.config.sweep_interval_s
            except Exception:
                self.background_failures += 1
                log.exception("background round failed")
            wait = max(min(next_prior, next_sweep) - time.monotonic(), 0.05)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)

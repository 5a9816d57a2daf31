"""The scoring engine: Score, Reward and Reset over the policies and the store.

It decides; handlers translate and stores persist. The hot path (ADR 0011):

- **Score is read-only on learned state.** It reads the user's model from the in-memory
  cache (`Models`), decides, appends the decision to the write-behind log
  (`DecisionLog`) and answers; a warm Score touches no thread and no disk. Pulls are
  counted beside the log, not in the model.
- **Rewards change models**, each as one atomic commit with compare-and-set on the state
  revision that writes through to the cache, so a second writer sharing the store makes
  us retry instead of losing an update. Rewards to one user are serialised by a per-user
  asyncio lock (no global lock), and a reward is acknowledged only after its commit.

The engine is assembled from its parts: `Models`, `DecisionLog`, `Shadows` (scored after
the answer through a bounded queue), `Reports` (Stats) and `Upkeep` (sweeper, pruning and
priors, each on its own schedule).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from oo_ml.config import ScoringConfig
from oo_ml.domain.contracts import Contracts
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate
from oo_ml.domain.engine.decision_log import DecisionLog
from oo_ml.domain.engine.locks import KeyedLocks
from oo_ml.domain.engine.models import Models, fit
from oo_ml.domain.engine.reports import Reports
from oo_ml.domain.engine.shadows import Shadows
from oo_ml.domain.engine.types import (
    FALLBACK_BUCKET,
    Candidate,
    DecisionListener,
    RewardResult,
    ScoreCommand,
    ScoreResult,
    StatsReport,
)
from oo_ml.domain.engine.upkeep import Upkeep
from oo_ml.domain.features import FEATURE_VERSIONS, Assembled, FeatureStore, Inputs, assemble
from oo_ml.domain.policies import Policy, build_policies
from oo_ml.domain.ports import (
    GenerationRecord,
    MarkRewarded,
    PutState,
    Store,
    StoredDecision,
    Write,
)
from oo_ml.domain.rng import DecisionIds, decision_time, rng_for
from oo_ml.errors import (
    Conflict,
    FailedPrecondition,
    NotFound,
    TransientStoreError,
    Unavailable,
    UnknownPolicy,
)

log = logging.getLogger(__name__)

# A reward that keeps losing its compare-and-set to other writers (other workers or
# replicas rewarding the same user) tries again after a jittered pause that doubles, so
# that hundreds of concurrent rewards for one user spread out instead of colliding.
_CAS_ATTEMPTS = 40
_FIRST_PAUSE_S = 0.001
_MAX_PAUSE_S = 0.1
# After the store failed us (a broker restart, a lost connection), the process that made
# a decision may still be retrying its flush: the decision log's backoff (up to 5 s) after
# a publish that timed out (5 s). Until this long after the last failure, a decision not
# found is UNAVAILABLE (retry) rather than NOT_FOUND, which a client takes as final.
_STORE_SETTLE_S = 12.0
# With a shared store, a decision not found that is younger than this is UNAVAILABLE, not
# NOT_FOUND: the worker or replica that made it may still be retrying its flush (a flush
# gives up on lost acks after 5 s and backs off up to 5 s between attempts).
_IN_FLIGHT_S = 30.0


class ScoringEngine:
    def __init__(
        self,
        config: ScoringConfig,
        store: Store,
        features: FeatureStore,
        contracts: Contracts,
        *,
        clock: Callable[[], float] = time.time,
        decision_ids: Callable[[], str] | None = None,
        join_wait_s: float = 0.0,
    ) -> None:
        self.config = config
        self.store = store
        self.features = features
        self.contracts = contracts
        self.clock = clock
        # Random ids in service; a seeded sequence replays a whole run (tests, simulation).
        self.decision_ids = decision_ids or DecisionIds()
        # With other workers or replicas on the store, a decision one of them made a
        # moment ago may still be in its write-behind buffer: a Reward waits this long
        # for it (from the decision's time, read from its id) before NOT_FOUND.
        self.join_wait_s = join_wait_s
        self._store_failed_at = -float("inf")  # monotonic; see _STORE_SETTLE_S
        self.policies: dict[str, Policy] = build_policies(config)
        for name in (config.default_policy, *config.shadow_policies):
            self.policy(name)  # fail at start-up, not at the first request
        self.listeners: list[DecisionListener] = []
        self.conflicts = 0
        """Reward commits that lost a compare-and-set to another writer and were retried."""
        self.locks = KeyedLocks()
        self.models = Models(store, config)
        self.log = DecisionLog(
            store,
            flush_ms=config.decision_flush_ms,
            flush_records=config.decision_flush_records,
            on_durable=self._durable,
        )
        self.sync = config.decision_durability == "sync"
        self.shadows = Shadows(
            self.policies,
            config.shadow_policies,
            self.models,
            self.log,
            queue_size=config.shadow_queue,
            cpu_share=config.shadow_cpu_share,
        )
        self.reports = Reports(store, features, contracts, self.models, self.log, clock=clock)
        self.upkeep = Upkeep(
            config, store, self.models, self.policies, reward=self.reward, clock=clock
        )

    # -- policies ---------------------------------------------------------------------------

    def policy(self, name: str) -> Policy:
        """The named policy; an empty name is the default policy."""
        resolved = name or self.config.default_policy
        try:
            return self.policies[resolved]
        except KeyError:
            raise UnknownPolicy(resolved, list(self.policies)) from None

    @property
    def users_locked(self) -> int:
        """Users with an update in flight or waiting (a gauge for operators)."""
        return len(self.locks)

    @property
    def background_failures(self) -> int:
        return self.upkeep.failures + self.shadows.counters.failures

    def _durable(self, record: DecisionRecord) -> None:
        """A decision reached the store: tell the listeners (ingest publishes TipServed)."""
        for listener in self.listeners:
            listener.decision_made(record)

    async def assemble(self, user_id: str, inputs: Inputs) -> Assembled:
        """The request's values, completed from the stores and the contracts' fallbacks."""
        now = self.clock()
        stored = await self.features.stored_features(user_id, now, inputs.timezone)
        return assemble(self.contracts, inputs, stored, now)

    # -- Score ----------------------------------------------------------------------------

    async def score(self, cmd: ScoreCommand) -> ScoreResult:
        policy = self.policy(cmd.policy)
        assembled = await self.assemble(cmd.user_id, cmd.inputs)
        now = assembled.now
        x = FEATURE_VERSIONS[policy.feature_version].vectorise(assembled)
        candidates = await self._attributed(cmd.candidates)
        arms = [c.arm for c in candidates]
        decision_id = self.decision_ids()
        # No lock and no write of learned state: a concurrent reward may land first or
        # after, and either way this decision is one a bandit could have made.
        state = await self.models.for_scoring(cmd.user_id, policy, arms)
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
        self.log.append(record)
        if self.sync:
            await self.log.durable(decision_id)
        self.shadows.offer(record, assembled)
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
            return c._replace(prompt_version=FALLBACK_BUCKET if g.fallback else g.prompt_version)

        return tuple(attributed(c) for c in candidates)

    async def record_generation(self, record: GenerationRecord) -> None:
        await self.store.record_generation(record)

    async def drain(self) -> None:
        """Until the shadow queue is empty and every logged decision is committed."""
        await self.shadows.drain()
        await self.log.durable()

    async def close(self) -> None:
        """Drain, then commit what is buffered and refuse new decisions. Idempotent."""
        await self.shadows.drain()
        await self.log.close()

    # -- Reward ---------------------------------------------------------------------------

    async def reward(
        self, decision_id: str, reward: float, *, source: str = "explicit", now: float | None = None
    ) -> RewardResult:
        """Apply a reward to a logged decision, once. A second reward changes nothing."""
        try:
            return await self._reward(decision_id, reward, source, now)
        except TransientStoreError:
            self._store_failed_at = time.monotonic()
            raise

    def _store_settling(self) -> bool:
        """The store failed us moments ago (a Reward's call or a decision log flush)."""
        failed_at = max(self._store_failed_at, self.log.failed_at, self.store.away_until)
        return time.monotonic() - failed_at < _STORE_SETTLE_S

    async def _reward(
        self, decision_id: str, reward: float, source: str, now: float | None
    ) -> RewardResult:
        now = self.clock() if now is None else now
        # A decision still in the write-behind buffer is committed first, so that the
        # reward's commit can find it (and a crash cannot keep a reward but lose its decision).
        await self.log.durable(decision_id)
        first = await self.store.get_decision(decision_id)
        if first is None:
            first = await self._logged_elsewhere(decision_id)
        if first is None:
            if self.join_wait_s > 0 and (
                self._store_settling() or self._may_be_in_flight(decision_id)
            ):
                # Another worker or replica may hold it unflushed (its flush retrying after
                # a failure): a retryable answer, since a client takes NOT_FOUND as final.
                raise Unavailable(
                    f"decision {decision_id!r} not found yet: another replica may still be"
                    " logging it; try again"
                )
            raise NotFound(f"decision {decision_id!r} not found")
        record = first.record
        if first.reward.reward is not None:
            return RewardResult(False, record.policy, record.chosen.arm)
        if source == "explicit" and now - record.created_at > self.config.reward_window_s:
            # A store may answer from a copy it kept, which cannot know that another
            # process rewarded the decision since: a duplicate is answered as one.
            again = await self.store.get_decision(decision_id)
            if again is None:
                raise NotFound(f"decision {decision_id!r} not found (the user was reset)")
            if again.reward.reward is not None:
                return RewardResult(False, record.policy, record.chosen.arm)
            raise FailedPrecondition(
                f"decision {decision_id!r} is {now - record.created_at:.0f}s old; rewards are accepted"
                f" for {self.config.reward_window_s:.0f}s"
            )
        async with self.locks.hold(record.user_id) as waited:
            pause = _FIRST_PAUSE_S
            for attempt in range(_CAS_ATTEMPTS):
                # Read again, unless the lock was free: then nothing of this process ran
                # since the read above (no await between them), and another process's
                # write of the decision fails the commit's once-only condition (Conflict),
                # after which it is read again. One store read fewer per reward.
                current = first if attempt == 0 and not waited else None
                if current is None:
                    current = await self.store.get_decision(decision_id)
                if current is None:
                    raise NotFound(f"decision {decision_id!r} not found (the user was reset)")
                if current.reward.reward is not None:
                    return RewardResult(False, record.policy, record.chosen.arm)
                # Re-read: the shadows' views may have been attached since.
                record = current.record
                writes = await self._reward_writes(record, reward, now, source)
                states = [w for w in writes if isinstance(w, PutState)]
                since = self.models.moment()
                try:
                    revisions = await self.store.commit(writes)
                except asyncio.CancelledError:
                    # Cancelled at a deadline: the commit may still land. The cache must
                    # not keep the old model, so read it again next time. (A commit that
                    # failed as TransientStoreError keeps it: warm users' Scores must not
                    # need a store that is away. If it landed all the same, the cached
                    # model is one reward behind until the user's next reward, whose
                    # compare-and-set fails on it and reads the store again.)
                    for w in states:
                        self.models.forget(w.user_id, w.policy)
                    raise
                except Conflict:
                    # Another writer moved a model (or rewarded the decision): read again.
                    self.conflicts += 1
                    for w in states:
                        self.models.forget(w.user_id, w.policy)
                    await asyncio.sleep(random.uniform(0, pause))
                    pause = min(2 * pause, _MAX_PAUSE_S)
                    continue
                for w in states:  # write through: the cache holds what the store holds
                    rev = revisions.get((w.user_id, w.policy))
                    if rev is None:
                        # The store kept its model: it had learned this reward already
                        # (an earlier attempt that crashed or timed out). Read it again.
                        self.models.forget(w.user_id, w.policy)
                    else:
                        self.models.put_written(w.user_id, w.policy, rev, w.state, since)
                if record.policy in self.policies:
                    self.upkeep.learned(record.policy)  # the prior may be due (data grew)
                return RewardResult(True, record.policy, record.chosen.arm)
        raise Unavailable(f"state of {record.user_id!r} kept changing; try again")

    def _may_be_in_flight(self, decision_id: str) -> bool:
        """A decision id made in the last `_IN_FLIGHT_S`: the process that made it may be
        retrying a failed flush (a flush gives up on lost acks after seconds, then retries)."""
        made_at = decision_time(decision_id)
        return made_at is not None and made_at - 1.0 <= time.time() < made_at + _IN_FLIGHT_S

    async def _logged_elsewhere(self, decision_id: str) -> StoredDecision | None:
        """A decision another process made in the last `join_wait_s` and has not flushed
        yet: wait for its flush (polling the store), until the decision's time plus the
        wait. Older ids, and ids that carry no time, are not waited for."""
        made_at = decision_time(decision_id)
        if self.join_wait_s <= 0 or made_at is None:
            return None
        until = made_at + self.join_wait_s
        if not made_at - 1.0 <= time.time() < until:  # a second of clock skew allowed
            return None
        pause = max(0.002, 2 * self.config.decision_flush_ms / 1000)
        while time.time() < until:
            await asyncio.sleep(min(pause, max(until - time.time(), 0.0)))
            found = await self.store.get_decision(decision_id)
            if found is not None:
                return found
        return None

    async def _reward_writes(
        self, record: DecisionRecord, reward: float, now: float, source: str
    ) -> list[Write]:
        arm = record.chosen.arm
        served = self.policies.get(record.policy)
        writes: list[Write] = [MarkRewarded(record.decision_id, reward, now, source)]
        if served is not None:
            revision, state = await self.models.load(record.user_id, served)
            state = self.models.with_arms(state, served.name, [arm])
            learned = state.learned(arm, fit(record.x, state.dim), reward)
            writes.append(PutState(record.user_id, served.name, revision, learned))
        writes.extend(await self.shadows.reward_writes(record, reward))
        return writes

    # -- Stats and Reset ------------------------------------------------------------------

    async def stats(self, user_id: str, policy_name: str) -> StatsReport:
        return await self.reports.stats(user_id, self.policy(policy_name))

    async def reset(self, user_id: str) -> tuple[int, int]:
        async with self.locks.hold(user_id):
            # Buffered decisions of the user are committed first, so that Reset clears
            # them too instead of seeing them land after it.
            await self.log.durable()
            try:
                return await self.store.reset_user(user_id)
            finally:
                self.models.forget_user(user_id)

    # -- background -----------------------------------------------------------------------

    async def sweep_once(self, now: float | None = None) -> int:
        return await self.upkeep.sweep_once(now)

    async def refresh_priors(self) -> None:
        await self.upkeep.refresh_priors()

    async def run_background(self, stop: asyncio.Event) -> None:
        await self.upkeep.run(stop)

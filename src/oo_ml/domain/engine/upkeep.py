"""Upkeep: the engine's background jobs, each on its own schedule.

    sweep    decisions left unrewarded past the window get the default reward
    prune    rewarded decisions past the retention are forgotten, and the oldest rewarded
             ones while the log is over OO_DECISION_LOG_MAX_MB (a warning from 90%)
    priors   each policy's population prior is recomputed from the users' models, on its
             timer and, while the prior pools every user, as soon as the rewards learned
             since it was made reach a tenth of those it pooled (`state.prior_due`)
    checkpoint  the store's write-ahead log is folded in and truncated, every minute

Each job has its own interval, its own failure counters and its own backoff, so a job that
fails (a prior refresh that cannot read the store, say) never holds back the others: it is
retried after 1 s, 2 s, 4 s ... (capped at its interval, or a minute if longer), logged,
counted, and shown by `status()` (metrics) and `healthy` (the `oo.upkeep` health entry).

A decision the sweeper cannot read (a corrupt or too-new record) is set aside by the
store with its reason, logged and counted, so one bad row cannot block every later sweep.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass

from oo_ml.config import ScoringConfig
from oo_ml.domain.engine.models import Models
from oo_ml.domain.engine.types import RewardResult
from oo_ml.domain.features import FEATURE_VERSIONS
from oo_ml.domain.policies import Policy
from oo_ml.domain.ports import Store
from oo_ml.domain.state import PolicyState, population_prior, prior_due
from oo_ml.errors import NotFound, UnreadableRecord

log = logging.getLogger(__name__)

# The most recently updated states a prior is computed from, per policy.
_PRIOR_SAMPLE = 2000
_SWEEP_BATCH = 500
_SWEEP_CONCURRENCY = 32
_FIRST_RETRY_S = 1.0
# The WAL is folded into the database (and truncated) this often, under load too.
_CHECKPOINT_S = 60.0
_MB = 1024 * 1024
_WARN_AT = 0.9
_REFILL = 0.9
_MAX_BACKOFF_S = 60.0
# How often the schedule looks again at least (a prior made due by the data's growth
# waits at most this long).
_POLL_S = 1.0
# Consecutive failures after which a job makes the `oo.upkeep` health entry NOT_SERVING.
UNHEALTHY_AFTER = 3

Rewarder = Callable[..., Awaitable[RewardResult]]


@dataclass
class JobStatus:
    """One job's schedule and record, as metrics and health see it."""

    name: str
    interval_s: float
    runs: int = 0
    failures_total: int = 0
    consecutive_failures: int = 0
    last_success_at: float = 0.0  # unix seconds; 0: never
    last_error: str = ""
    next_at: float = 0.0  # monotonic

    def backoff_s(self) -> float:
        # Quick first retries for a passing fault, then no more often than the interval
        # (or once a minute, for long intervals).
        cap = min(self.interval_s, _MAX_BACKOFF_S)
        return float(min(_FIRST_RETRY_S * 2 ** max(self.consecutive_failures - 1, 0), cap))


class Upkeep:
    def __init__(
        self,
        config: ScoringConfig,
        store: Store,
        models: Models,
        policies: Mapping[str, Policy],
        *,
        reward: Rewarder,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.models = models
        self.policies = policies
        self.reward = reward
        self.clock = clock
        self.set_aside = 0
        """Decisions the sweeper could not read and set aside."""
        self._jobs: dict[str, tuple[JobStatus, Callable[[], Awaitable[object]]]] = {
            "sweep": (JobStatus("sweep", config.sweep_interval_s), self.sweep_once),
            "prune": (JobStatus("prune", config.sweep_interval_s), self.prune),
            "priors": (JobStatus("priors", config.prior_refresh_s), self.refresh_priors),
            "checkpoint": (JobStatus("checkpoint", _CHECKPOINT_S), self.store.checkpoint),
        }
        self.log_rows = 0
        self.log_bytes = 0
        """The decision log's size at the last prune (rows, bytes on disk)."""
        self.pruned_for_size = 0
        """Rewarded decisions forgotten early to keep the log under OO_DECISION_LOG_MAX_MB."""
        self._learned: dict[str, int] = {}
        """Per policy, the rewards this process learned under it since its prior was made."""
        self._pooled_all: set[str] = set()
        """Policies whose last prior pooled every user's state (not a sample of them)."""

    def add_job(self, name: str, interval_s: float, job: Callable[[], Awaitable[object]]) -> None:
        """One more job on this schedule (the store's own chores, such as pruning the
        change sequence): its failures are retried, counted and shown like the others'."""
        self._jobs[name] = (JobStatus(name, interval_s), job)

    def status(self) -> list[JobStatus]:
        return [status for status, _ in self._jobs.values()]

    @property
    def healthy(self) -> bool:
        return all(s.consecutive_failures < UNHEALTHY_AFTER for s in self.status())

    @property
    def failures(self) -> int:
        return sum(s.failures_total for s in self.status())

    # -- the jobs ---------------------------------------------------------------------------

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
                    result = await self.reward(decision_id, default, source="default", now=now)
                except NotFound:  # reset meanwhile
                    return False
                except UnreadableRecord as e:
                    await self.store.set_aside(decision_id, str(e))
                    self.set_aside += 1
                    log.warning("decision %s set aside by the sweeper: %s", decision_id, e)
                    return False
                return result.applied

        applied = 0
        while True:
            ids = await self.store.pending_before(now - self.config.reward_window_s, _SWEEP_BATCH)
            applied += sum(await asyncio.gather(*(give(d) for d in ids)))
            if len(ids) < _SWEEP_BATCH:
                return applied

    async def prune(self) -> int:
        """Forget rewarded decisions past the retention, then, while the log is over
        OO_DECISION_LOG_MAX_MB, the oldest rewarded ones (pending decisions are kept: a
        reward may still come for them)."""
        pruned = await self.store.prune_decisions(self.clock() - self.config.decision_retention_s)
        rows, size = await self.store.decision_log_size()
        cap = self.config.decision_log_max_mb * _MB
        if size > cap and rows:
            # Down to 90% of the cap, so the next prune is not due at the next decision.
            excess = math.ceil((size - _REFILL * cap) / (size / rows))
            forgotten = await self.store.prune_oldest_rewarded(excess)
            self.pruned_for_size += forgotten
            pruned += forgotten
            log.warning(
                "decision log at %.1f MB, over OO_DECISION_LOG_MAX_MB=%.1f: forgot the %d"
                " oldest rewarded decisions",
                size / _MB,
                cap / _MB,
                forgotten,
            )
            rows, size = await self.store.decision_log_size()
        elif size > _WARN_AT * cap:
            log.warning(
                "decision log at %.0f%% of OO_DECISION_LOG_MAX_MB (%.1f of %.1f MB)",
                100 * size / cap,
                size / _MB,
                cap / _MB,
            )
        self.log_rows, self.log_bytes = rows, size
        return pruned

    def learned(self, policy: str) -> None:
        """A reward was learned under `policy` (the served one): when the data have grown
        enough since its prior was made (`state.prior_due`), the prior is refreshed at the
        schedule's next look instead of at its timer. Only while the prior pools every
        user: the growth of a sample is not what this process counts. With several
        workers or replicas each counts its own rewards, so the trigger comes later."""
        n = self._learned.get(policy, 0) + 1
        self._learned[policy] = n
        if policy in self._pooled_all and prior_due(self.models.priors.get(policy), n):
            status = self._jobs["priors"][0]
            if status.consecutive_failures == 0:  # a failing job keeps its backoff
                status.next_at = min(status.next_at, time.monotonic())

    async def refresh_priors(self) -> None:
        """Recompute each policy's population prior (`state.population_prior`: per arm, a
        regression of the sampled users' own data pooled, their intercepts integrated out,
        each coefficient's precision set by the evidence; ADR 0021). The store decodes on
        its reader thread and the fit runs on a worker thread, so Score keeps answering."""
        for policy in self.policies.values():
            self._learned[policy.name] = 0
            states = await self.store.policy_states(policy.name, _PRIOR_SAMPLE)
            if len(states) < _PRIOR_SAMPLE:
                self._pooled_all.add(policy.name)
            else:
                self._pooled_all.discard(policy.name)
            if states:
                prior = await asyncio.to_thread(self._prior_of, policy, states)
                if prior is not None:
                    self.models.set_prior(policy.name, prior)

    def _prior_of(self, policy: Policy, states: list[PolicyState]) -> PolicyState | None:
        fv = FEATURE_VERSIONS[policy.feature_version]
        return population_prior(
            (st if st.dim == fv.dim else st.migrated(fv.name, fv.dim) for st in states),
            policy.name,
            fv.name,
            fv.dim,
            self.config.ridge_lambda,
        )

    # -- the schedule -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run each job when it is due, until stop is set."""
        while not stop.is_set():
            now = time.monotonic()
            for status, job in self._jobs.values():
                if stop.is_set():
                    return
                if now >= status.next_at:
                    await self._run_job(status, job)
            wait = max(min(s.next_at for s in self.status()) - time.monotonic(), 0.01)
            wait = min(wait, _POLL_S)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)

    async def _run_job(self, status: JobStatus, job: Callable[[], Awaitable[object]]) -> None:
        status.runs += 1
        try:
            await job()
        except Exception as e:
            status.failures_total += 1
            status.consecutive_failures += 1
            status.last_error = f"{type(e).__name__}: {e}"
            delay = status.backoff_s()
            status.next_at = time.monotonic() + delay
            log.error(
                "upkeep job %s failed (%d in a row; next try in %.0f s): %s",
                status.name,
                status.consecutive_failures,
                delay,
                status.last_error,
                exc_info=status.consecutive_failures == 1,
            )
            return
        status.consecutive_failures = 0
        status.last_error = ""
        status.last_success_at = self.clock()
        status.next_at = time.monotonic() + status.interval_s

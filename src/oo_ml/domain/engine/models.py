"""Per-user models as the policies see them, decoded once and kept in memory.

`Models` is a bounded cache of decoded `PolicyState`s keyed by (user, policy), each with the
store revision it was read at. A warm Score reads it without touching a thread or the
disk. Only rewards change a model, and every reward is a compare-and-set on the store that
writes through to the cache on success and forgets the entry on a conflict; so in one
process a cached model always equals the one the store would decode (tests check it after
any mix of Score, Reward, Reset and restart).

The cache is sized by `OO_STATE_CACHE_MB`, from an estimate of each model's arrays; the
least recently used models go first. New arms start from the population prior
(`with_arms`), which upkeep refreshes into `priors`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from oo_ml.config import ScoringConfig
from oo_ml.domain.features import FEATURE_VERSIONS, Vector
from oo_ml.domain.policies import Policy
from oo_ml.domain.ports import EVERY_POLICY, EVERY_USER, PROFILE, Change, StateStore
from oo_ml.domain.state import PolicyState, empty_state

# What a cached model costs beside its arrays: the dict entry, the dataclasses, the
# numpy headers (about 112 bytes an array) and a stacked copy of the arrays for scoring.
_ENTRY_BYTES = 600
_ARM_BYTES = 400


def model_bytes(state: PolicyState) -> int:
    """An estimate of what a decoded model holds in memory."""
    per_arm = 2 * 8 * (state.dim * state.dim + state.dim) + _ARM_BYTES
    return _ENTRY_BYTES + per_arm * len(state.arms)


class Models:
    def __init__(self, store: StateStore, config: ScoringConfig) -> None:
        self.store = store
        self.config = config
        # The population prior of each policy, refreshed by upkeep.
        self.priors: dict[str, PolicyState] = {}
        self.budget_bytes = int(config.state_cache_mb * 1024 * 1024)
        # (user, policy) -> [revision, the stored model, its size, the scoring view]; the
        # view is the model with the arms Score asked for added from the prior, kept so
        # that a warm Score neither rebuilds arms nor re-stacks arrays. It is not what the
        # store holds and is never written: rewards start from the stored model.
        self._cache: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()
        # Bumped when a prior changes: views made from an older prior are rebuilt.
        self._prior_generation = 0
        self.bytes = 0
        # A user's mark is the tick of the last time their entries were forgotten or
        # another process's change named them (a reset, a conflict, the feed): a store
        # read or a write-through that started at an earlier tick must not cache what it
        # holds, it may be older than the store. Marks are dropped in bulk when there are
        # many (then every read under way counts as overtaken).
        self._tick = 0
        self._marks: dict[str, int] = {}
        self._marks_dropped = -1
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.changes_seen = 0

    def __len__(self) -> int:
        return len(self._cache)

    async def load(self, user_id: str, policy: Policy) -> tuple[int, PolicyState]:
        """The user's state under the policy and its store revision (0: none stored)."""
        key = (user_id, policy.name)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return cached[0], cached[1]
        self.misses += 1
        fv = FEATURE_VERSIONS[policy.feature_version]
        started = self.moment()
        stored = await self.store.get(user_id, policy.name)
        if stored is None:
            revision, state = 0, empty_state(policy.name, fv.name, fv.dim, self.config.ridge_lambda)
        else:
            revision, state = stored.revision, stored.state
            if state.dim < fv.dim:
                # The policy moved to a larger feature version: keep what was learned (ADR 0005).
                state = state.migrated(fv.name, fv.dim)
        # A write that landed while we read (another coroutine's reward) wins.
        current = self._cache.get(key)
        if current is not None and current[0] >= revision:
            return current[0], current[1]
        if not self.changed_since(user_id, started):
            self.put(user_id, policy.name, revision, state)
        return revision, state

    async def for_scoring(self, user_id: str, policy: Policy, arms: Sequence[str]) -> PolicyState:
        """The user's model with every arm of `arms` (new ones from the prior): what a
        policy scores with. Warm, it is the cached view, stacked arrays included."""
        revision, state = await self.load(user_id, policy)
        entry = self._cache.get((user_id, policy.name))
        if entry is not None and entry[3] is not None and entry[4] == self._prior_generation:
            view: PolicyState = entry[3]
            if view.arms.keys() >= set(arms):  # a C-level subset test, not a loop
                return view
            state = view  # keep the arms added before
        view = self.with_arms(state, policy.name, arms)
        if entry is not None and entry[0] == revision:
            entry[3], entry[4] = view, self._prior_generation
            size = model_bytes(view)  # the view holds the stored arms and the added ones
            self.bytes += size - entry[2]
            entry[2] = size
        return view

    def set_prior(self, policy: str, prior: PolicyState | None) -> None:
        """A new population prior (None: none); views built on the old one are rebuilt."""
        if prior is None:
            self.priors.pop(policy, None)
        else:
            self.priors[policy] = prior
        self._prior_generation += 1

    def put(self, user_id: str, policy: str, revision: int, state: PolicyState) -> None:
        """Record the model the store now holds at `revision` (after a commit, or a read)."""
        key = (user_id, policy)
        old = self._cache.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        size = model_bytes(state)
        self._cache[key] = [revision, state, size, None, 0]
        self.bytes += size
        while self.bytes > self.budget_bytes and self._cache:
            _, gone = self._cache.popitem(last=False)
            self.bytes -= gone[2]
            self.evictions += 1

    def moment(self) -> int:
        """Now, for `changed_since`: take it before a store read or a commit."""
        return self._tick

    def changed_since(self, user_id: str, moment: int) -> bool:
        """Whether the user's entries were forgotten, or another process's change named
        them, after `moment`."""
        return self._marks.get(user_id, -1) > moment or self._marks_dropped > moment

    def _mark(self, user_id: str) -> None:
        self._tick += 1
        self._marks[user_id] = self._tick
        if len(self._marks) > 4 * max(len(self._cache), 1024):
            # Only reads and writes under way care about a mark; old ones can go.
            self._marks.clear()
            self._marks_dropped = self._tick

    def put_written(
        self, user_id: str, policy: str, revision: int, state: PolicyState, since: int
    ) -> None:
        """Write-through of our commit at `revision`, begun at `since` (`moment()`): unless
        the cache already holds that revision or a newer one, or a change was reported
        meanwhile (another writer may have moved the model past ours), then the entry is
        dropped and the next read fetches it."""
        entry = self._cache.get((user_id, policy))
        if entry is not None and entry[0] >= revision:
            return
        if self.changed_since(user_id, since):
            self.forget(user_id, policy)
            return
        self.put(user_id, policy, revision, state)

    def forget(self, user_id: str, policy: str) -> None:
        """Drop an entry the store may have moved past (a conflict, another writer)."""
        self._mark(user_id)
        old = self._cache.pop((user_id, policy), None)
        if old is not None:
            self.bytes -= old[2]

    def forget_user(self, user_id: str) -> None:
        self._mark(user_id)
        for key in [k for k in self._cache if k[0] == user_id]:
            self.forget(*key)

    def apply(self, changes: Sequence[Change]) -> None:
        """Writes other processes made to the shared store (a change feed): a cached model
        older than the change is replaced by the new one when the change carries it, else
        forgotten, so the next read fetches it. Our own write-throughs come back through
        the feed too, at a revision the cache already holds, and change nothing."""
        self.changes_seen += len(changes)
        for c in changes:
            if c.user_id == EVERY_USER:
                self.clear()
            elif c.policy == EVERY_POLICY:
                self.forget_user(c.user_id)
            elif c.policy != PROFILE:
                entry = self._cache.get((c.user_id, c.policy))
                if entry is None:
                    # Not cached, but a read may be under way: it must not cache an older one.
                    self._mark(c.user_id)
                elif c.revision == 0 or entry[0] < c.revision:
                    if c.state is not None:
                        self.put(c.user_id, c.policy, c.revision, c.state)
                    else:
                        self.forget(c.user_id, c.policy)

    def clear(self) -> None:
        """Forget every cached model (the change feed lost track of the store)."""
        for user_id, policy in list(self._cache):
            self.forget(user_id, policy)

    def cached(self, user_id: str, policy: str) -> tuple[int, PolicyState] | None:
        """The cached entry, for tests and operators; no store read, no LRU update."""
        entry = self._cache.get((user_id, policy))
        return (entry[0], entry[1]) if entry is not None else None

    def cached_keys(self) -> list[tuple[str, str]]:
        return list(self._cache)

    def with_arms(self, state: PolicyState, policy: str, arms: Sequence[str]) -> PolicyState:
        """The state with every arm of `arms`, new ones started from the prior."""
        return state.with_arms(list(arms), self.priors.get(policy), self.config.max_arms)


def fit(x: Vector, dim: int) -> Vector:
    """x padded with zeros to dim (a v1 vector read by a v2 model)."""
    return x if x.shape[0] == dim else np.concatenate([x, np.zeros(dim - x.shape[0])])

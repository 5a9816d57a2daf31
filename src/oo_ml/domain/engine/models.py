"""Per-user models as the policies see them: read from the state store, grown to the
policy's feature version, with new arms started from the population prior."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from oo_ml.config import ScoringConfig
from oo_ml.domain.features import FEATURE_VERSIONS, Vector
from oo_ml.domain.policies import Policy
from oo_ml.domain.ports import StateStore
from oo_ml.domain.state import PolicyState, empty_state


class Models:
    def __init__(self, store: StateStore, config: ScoringConfig) -> None:
        self.store = store
        self.config = config
        # The population prior of each policy, refreshed by upkeep (`Priors`).
        self.priors: dict[str, PolicyState] = {}

    async def load(self, user_id: str, policy: Policy) -> tuple[int, PolicyState]:
        """The user's state under the policy and its store revision (0: none stored)."""
        fv = FEATURE_VERSIONS[policy.feature_version]
        stored = await self.store.get(user_id, policy.name)
        if stored is None:
            return 0, empty_state(policy.name, fv.name, fv.dim, self.config.ridge_lambda)
        state = stored.state
        if state.dim < fv.dim:
            # The policy moved to a larger feature version: keep what was learned (ADR 0005).
            state = state.migrated(fv.name, fv.dim)
        return stored.revision, state

    def with_arms(self, state: PolicyState, policy: str, arms: Sequence[str]) -> PolicyState:
        """The state with every arm of `arms`, new ones started from the prior."""
        return state.with_arms(list(arms), self.priors.get(policy), self.config.max_arms)


def fit(x: Vector, dim: int) -> Vector:
    """x padded with zeros to dim (a v1 vector read by a v2 model)."""
    return x if x.shape[0] == dim else np.concatenate([x, np.zeros(dim - x.shape[0])])

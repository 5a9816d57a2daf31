"""Learned state as plain domain values: per-arm ridge models and their counters.

A `PolicyState` is one user's (or the population prior's) state under one policy. It is
treated as a value: updates return a new state and leave the old one untouched, so a
failed compare-and-set never leaves a half-applied model in memory. Persisted form:
`oo.state.v1.PolicyState`, converted by `state_codec`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from oo_ml.features import Vector

Matrix = np.ndarray  # (D, D) float64

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class ArmModel:
    """Ridge regression of reward on x for one arm, with A^-1 kept by Sherman-Morrison."""

    a_inv: Matrix
    b: Vector
    pulls: int = 0
    rewarded: int = 0
    reward_sum: float = 0.0

    @staticmethod
    def fresh(
        dim: int, ridge_lambda: float, prior_theta: Vector | None = None, prior_weight: float = 0.0
    ) -> ArmModel:
        # A = c*I and b = c*theta0 (c = lambda + prior_weight) make the ridge estimate shrink
        # toward the population's theta0 instead of toward zero:
        # theta = (c*I + X'X)^-1 (c*theta0 + X'r); the user's own data outweighs it as it grows.
        if prior_theta is None:
            return ArmModel(a_inv=np.eye(dim) / ridge_lambda, b=np.zeros(dim))
        c = ridge_lambda + prior_weight
        return ArmModel(a_inv=np.eye(dim) / c, b=c * np.asarray(prior_theta, dtype=np.float64))

    @property
    def theta(self) -> Vector:
        return np.asarray(self.a_inv @ self.b, dtype=np.float64)

    def learn(self, x: Vector, reward: float) -> ArmModel:
        """A += x x', b += r x, with A^-1 updated in O(D^2) (Sherman-Morrison)."""
        ax = self.a_inv @ x
        a_inv = self.a_inv - np.outer(ax, ax) / (1.0 + float(x @ ax))
        return replace(
            self,
            a_inv=a_inv,
            b=self.b + reward * x,
            rewarded=self.rewarded + 1,
            reward_sum=self.reward_sum + reward,
        )

    def pulled(self) -> ArmModel:
        return replace(self, pulls=self.pulls + 1)

    def padded(self, dim: int, ridge_lambda: float) -> ArmModel:
        """Grow D without losing what was learned: A -> blockdiag(A, lambda*I), b -> [b, 0]."""
        d = self.b.shape[0]
        if d == dim:
            return self
        a_inv = np.zeros((dim, dim))
        a_inv[:d, :d] = self.a_inv
        a_inv[d:, d:] = np.eye(dim - d) / ridge_lambda
        return replace(self, a_inv=a_inv, b=np.concatenate([self.b, np.zeros(dim - d)]))


@dataclass(frozen=True, slots=True)
class PolicyState:
    policy: str
    feature_version: str
    dim: int
    ridge_lambda: float
    decisions: int = 0
    rewards: int = 0
    arms: dict[str, ArmModel] = field(default_factory=dict)

    def with_arms(
        self, arms: list[str], prior: PolicyState | None = None, max_arms: int | None = None
    ) -> PolicyState:
        """Add the arms this state has not seen, each starting from the population prior.
        Beyond max_arms, the least-used arms not in `arms` are dropped: arm names come
        from clients, and every arm costs a D x D matrix on every read and write."""
        missing = [a for a in arms if a not in self.arms]
        if not missing:
            return self
        new = dict(self.arms)
        for a in missing:
            if prior is not None and a in prior.arms and prior.dim == self.dim:
                # The prior's arm is the starting model (A = c*I, b = c*theta0), counters 0.
                start = prior.arms[a]
                new[a] = ArmModel(a_inv=start.a_inv, b=start.b)
            else:
                new[a] = ArmModel.fresh(self.dim, self.ridge_lambda)
        if max_arms is not None and len(new) > max_arms:
            wanted = set(arms)
            spare = sorted(
                (a for a in new if a not in wanted), key=lambda a: new[a].pulls + new[a].rewarded
            )
            for a in spare[: len(new) - max_arms]:
                del new[a]
        return replace(self, arms=new)

    def chose(self, arm: str) -> PolicyState:
        arms = dict(self.arms)
        arms[arm] = arms[arm].pulled()
        return replace(self, arms=arms, decisions=self.decisions + 1)

    def learned(self, arm: str, x: Vector, reward: float) -> PolicyState:
        arms = dict(self.arms)
        model = arms.get(arm) or ArmModel.fresh(self.dim, self.ridge_lambda)
        arms[arm] = model.learn(x, reward)
        return replace(self, arms=arms, rewards=self.rewards + 1)

    def migrated(self, feature_version: str, dim: int) -> PolicyState:
        """The same state under a larger feature version, learned dimensions kept."""
        if dim < self.dim:
            raise ValueError(f"cannot shrink state from D={self.dim} to D={dim}")
        return replace(
            self,
            feature_version=feature_version,
            dim=dim,
            arms={a: m.padded(dim, self.ridge_lambda) for a, m in self.arms.items()},
        )


def empty_state(policy: str, feature_version: str, dim: int, ridge_lambda: float) -> PolicyState:
    return PolicyState(
        policy=policy, feature_version=feature_version, dim=dim, ridge_lambda=ridge_lambda
    )


# The most a population prior can weigh, in ridge-precision units (roughly observations):
# the shared-plus-per-user trade-off. See docs/learning.md for how it was chosen.
PRIOR_WEIGHT = 20.0


def population_prior(
    states: Iterable[PolicyState],
    policy: str,
    feature_version: str,
    dim: int,
    ridge_lambda: float,
    *,
    max_weight: float | None = None,
) -> PolicyState | None:
    """The population prior of a policy: per arm, the users' theta averaged with weights =
    the rewards each user's arm learned from. None when no arm has learned anything.
    Its arms start new users at A = c*I, b = c*theta (see `ArmModel.fresh`), with
    c = lambda + w and w = 1 / (1/max_weight + 1/n), n the rewards the average is made of:
    a prior made of little evidence weighs little, one made of much weighs up to max_weight."""
    cap = PRIOR_WEIGHT if max_weight is None else max_weight
    sums: dict[str, tuple[Vector, float]] = {}
    for state in states:
        for arm, model in state.arms.items():
            if model.rewarded == 0:
                continue
            total, weight = sums.get(arm, (np.zeros(dim), 0.0))
            sums[arm] = (total + model.rewarded * model.theta, weight + model.rewarded)
    if not sums:
        return None
    return PolicyState(
        policy=policy,
        feature_version=feature_version,
        dim=dim,
        ridge_lambda=ridge_lambda,
        arms={
            a: ArmModel.fresh(
                dim, ridge_lambda, total / w, 1.0 / (1.0 / cap + 1.0 / w) if cap else 0.0
            )
            for a, (total, w) in sums.items()
        },
    )

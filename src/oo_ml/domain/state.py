"""Learned state as plain domain values: per-arm ridge models and their counters.

A `PolicyState` is one user's (or the population prior's) state under one policy. It is
treated as a value: updates return a new state and leave the old one untouched, so a
failed compare-and-set never leaves a half-applied model in memory. Persisted form:
`oo.state.v1.PolicyState`, converted by `state_codec`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from oo_ml.domain.features import Vector

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
    def fresh(dim: int, ridge_lambda: float, prior_theta: Vector | None = None) -> ArmModel:
        # A = lambda*I and b = lambda*theta0 make the ridge estimate shrink toward the
        # population's theta0 instead of toward zero: theta = (lambda*I + X'X)^-1 (lambda*theta0 + X'r).
        b = (
            np.zeros(dim)
            if prior_theta is None
            else ridge_lambda * np.asarray(prior_theta, dtype=np.float64)
        )
        return ArmModel(a_inv=np.eye(dim) / ridge_lambda, b=b)

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
class Stacked:
    """A state's arms as arrays: row `index[arm]` of each."""

    index: dict[str, int]
    theta: Matrix  # (K, D)
    a_inv: npt.NDArray[np.float64]  # (K, D, D)
    rewarded: Vector  # (K,)
    reward_sum: Vector  # (K,)

    def rows(self, arms: Sequence[str]) -> npt.NDArray[np.intp]:
        index = self.index
        return np.fromiter((index[a] for a in arms), dtype=np.intp, count=len(arms))


@dataclass(frozen=True, slots=True)
class PolicyState:
    policy: str
    feature_version: str
    dim: int
    ridge_lambda: float
    decisions: int = 0
    rewards: int = 0
    arms: dict[str, ArmModel] = field(default_factory=dict)
    # Derived, never stored or compared: the arms stacked for vectorised scoring, built on
    # first use. A state is a value (updates make new states), so this never goes stale.
    _stacked: Stacked | None = field(default=None, init=False, repr=False, compare=False)

    def stacked(self) -> Stacked:
        """Every arm's theta and A^-1 as arrays, so scoring all candidates is one matmul."""
        if self._stacked is None:
            names = list(self.arms)
            models = [self.arms[a] for a in names]
            if models:
                a_inv = np.stack([m.a_inv for m in models])
                b = np.stack([m.b for m in models])
            else:
                a_inv = np.zeros((0, self.dim, self.dim))
                b = np.zeros((0, self.dim))
            stacked = Stacked(
                index={a: i for i, a in enumerate(names)},
                theta=np.einsum("kij,kj->ki", a_inv, b),
                a_inv=a_inv,
                rewarded=np.array([m.rewarded for m in models], dtype=np.float64),
                reward_sum=np.array([m.reward_sum for m in models], dtype=np.float64),
            )
            object.__setattr__(self, "_stacked", stacked)  # a cache on a frozen value
            return stacked
        return self._stacked

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
            theta0 = None
            if prior is not None and a in prior.arms and prior.dim == self.dim:
                theta0 = prior.arms[a].theta
            new[a] = ArmModel.fresh(self.dim, self.ridge_lambda, theta0)
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


def population_prior(
    states: Iterable[PolicyState], policy: str, feature_version: str, dim: int, ridge_lambda: float
) -> PolicyState | None:
    """The population prior of a policy: per arm, the users' theta averaged with weights =
    the rewards each user's arm learned from. None when no arm has learned anything.
    Its arms start new users at A = lambda*I, b = lambda*theta (see `ArmModel.fresh`)."""
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
        arms={a: ArmModel.fresh(dim, ridge_lambda, total / w) for a, (total, w) in sums.items()},
    )

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
    prior_precision: Vector | None = None
    """The prior folded into A and b: A = diag(prior_precision) + X'X, b = prior_precision *
    prior_theta + X'r. None: the plain ridge prior, lambda*I and 0."""
    prior_theta: Vector | None = None

    @staticmethod
    def fresh(
        dim: int,
        ridge_lambda: float,
        prior_theta: Vector | None = None,
        prior_weight: float | Vector = 0.0,
    ) -> ArmModel:
        # A = C and b = C theta0 (C = diag(lambda + prior_weight)) make the ridge estimate
        # shrink toward the population's theta0 instead of toward zero:
        # theta = (C + X'X)^-1 (C theta0 + X'r); the user's own data outweighs it as it grows.
        if prior_theta is None:
            return ArmModel(a_inv=np.eye(dim) / ridge_lambda, b=np.zeros(dim))
        c = ridge_lambda + np.broadcast_to(np.asarray(prior_weight, dtype=np.float64), (dim,))
        theta0 = np.asarray(prior_theta, dtype=np.float64)
        return ArmModel(
            a_inv=np.diag(1.0 / c), b=c * theta0, prior_precision=c.copy(), prior_theta=theta0
        )

    def own(self, ridge_lambda: float) -> tuple[Matrix, Vector]:
        """X'X and X'r: what this arm learned, without its prior."""
        dim = self.b.shape[0]
        c = np.full(dim, ridge_lambda) if self.prior_precision is None else self.prior_precision
        theta0 = np.zeros(dim) if self.prior_theta is None else self.prior_theta
        return np.linalg.inv(self.a_inv) - np.diag(c), self.b - c * theta0

    def rebased(self, prior: ArmModel, ridge_lambda: float) -> ArmModel:
        """The same data under another prior (a population prior's arm)."""
        if (
            self.prior_precision is not None
            and prior.prior_precision is not None
            and self.prior_theta is not None
            and prior.prior_theta is not None
            and np.array_equal(self.prior_precision, prior.prior_precision)
            and np.array_equal(self.prior_theta, prior.prior_theta)
        ):
            return self
        if prior.prior_precision is None or prior.prior_theta is None:
            return self
        xx, xr = self.own(ridge_lambda)
        c, theta0 = prior.prior_precision, prior.prior_theta
        return replace(
            self,
            a_inv=np.linalg.inv(xx + np.diag(c)),
            b=xr + c * theta0,
            prior_precision=c,
            prior_theta=theta0,
        )

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
        pad = np.zeros(dim - d)
        return replace(
            self,
            a_inv=a_inv,
            b=np.concatenate([self.b, pad]),
            prior_precision=None
            if self.prior_precision is None
            else np.concatenate([self.prior_precision, pad + ridge_lambda]),
            prior_theta=None
            if self.prior_theta is None
            else np.concatenate([self.prior_theta, pad]),
        )


def _frozen(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """`a`, read-only: `Stacked.of` hands out these arrays themselves, not copies, so a
    caller that wrote into one would corrupt the cached state; now it raises instead."""
    a.flags.writeable = False
    return a


_ROWS_KEPT = 8
"""Candidate lists whose rows a `Stacked` remembers (a user's candidates rarely change)."""


@dataclass(frozen=True, slots=True)
class Stacked:
    """A state's arms as arrays: row `index[arm]` of each."""

    index: dict[str, int]
    theta: Matrix  # (K, D)
    a_inv: npt.NDArray[np.float64]  # (K, D, D)
    rewarded: Vector  # (K,)
    reward_sum: Vector  # (K,)
    # The rows of candidate lists seen before, None for "every arm, in stacking order" (no
    # gather needed): a warm Score looks its candidates up once instead of arm by arm.
    _rows: dict[tuple[str, ...], npt.NDArray[np.intp] | None] = field(
        default_factory=dict, compare=False, repr=False
    )
    _reward_sd: Vector | None = field(default=None, compare=False, repr=False)

    def reward_sd(self) -> Vector:
        """Each arm's reward noise, sqrt(p(1-p)) with p its mean reward smoothed by a
        Beta(1, 1) prior; made once per state (it changes only with a reward)."""
        if self._reward_sd is None:
            p = (self.reward_sum + 1.0) / (self.rewarded + 2.0)
            # Rewards in [-1, 1] can put p outside [0, 1]: the variance is then taken as 0.
            sd = _frozen(np.sqrt(np.maximum(p * (1.0 - p), 0.0)))
            object.__setattr__(self, "_reward_sd", sd)  # a cache on a frozen value
            return sd
        return self._reward_sd

    def rows(self, arms: Sequence[str]) -> npt.NDArray[np.intp] | None:
        """The rows of `arms`, or None when they are every arm in stacking order."""
        key = arms if isinstance(arms, tuple) else tuple(arms)
        memo = self._rows
        try:
            return memo[key]
        except KeyError:
            pass
        index = self.index
        rows = np.fromiter((index[a] for a in key), dtype=np.intp, count=len(key))
        if len(memo) >= _ROWS_KEPT:
            memo.clear()
        whole = len(rows) == len(index) and bool((rows == np.arange(len(rows))).all())
        memo[key] = found = None if whole else rows
        return found

    def of(self, arms: Sequence[str]) -> tuple[Matrix, npt.NDArray[np.float64], Vector]:
        """theta, A^-1 and the reward noise (`reward_sd`) of `arms`, in their order."""
        rows = self.rows(arms)
        if rows is None:
            return self.theta, self.a_inv, self.reward_sd()
        return self.theta[rows], self.a_inv[rows], self.reward_sd()[rows]


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
                theta=_frozen(np.einsum("kij,kj->ki", a_inv, b)),
                a_inv=_frozen(a_inv),
                rewarded=_frozen(np.array([m.rewarded for m in models], dtype=np.float64)),
                reward_sum=_frozen(np.array([m.reward_sum for m in models], dtype=np.float64)),
            )
            object.__setattr__(self, "_stacked", stacked)  # a cache on a frozen value
            return stacked
        return self._stacked

    def with_arms(
        self, arms: list[str], prior: PolicyState | None = None, max_arms: int | None = None
    ) -> PolicyState:
        """Add the arms this state has not seen, each starting from the population prior,
        and move the arms it has onto the prior when the prior has changed (what they
        learned is kept; only the prior they shrink toward is replaced).
        Beyond max_arms, the least-used arms not in `arms` are dropped: arm names come
        from clients, and every arm costs a D x D matrix on every read and write."""
        usable = prior is not None and prior.dim == self.dim
        missing = [a for a in arms if a not in self.arms]
        stale = [
            a
            for a in arms
            if usable
            and prior is not None
            and a in self.arms
            and a in prior.arms
            and self.arms[a].rebased(prior.arms[a], self.ridge_lambda) is not self.arms[a]
        ]
        if not missing and not stale:
            return self
        new = dict(self.arms)
        for a in stale:
            assert prior is not None
            new[a] = self.arms[a].rebased(prior.arms[a], self.ridge_lambda)
        for a in missing:
            if usable and prior is not None and a in prior.arms:
                # The prior's arm is the starting model (A = C, b = C theta0), counters 0.
                start = prior.arms[a]
                new[a] = ArmModel(
                    a_inv=start.a_inv,
                    b=start.b,
                    prior_precision=start.prior_precision,
                    prior_theta=start.prior_theta,
                )
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


# The most a population prior can weigh on each coefficient, in ridge-precision units
# (roughly observations): the shared-plus-per-user trade-off. The first dimension is the
# bias of every feature version; users differ most in their intercepts (their taste for an
# arm), so the prior holds the intercept loosely and the slopes firmly. PRIOR_WEIGHT_BIAS
# is also the precision of a user's own intercept when the prior is pooled (the random
# effect `population_prior` integrates out). See docs/learning.md for how these were
# chosen.
PRIOR_WEIGHT = 1000.0
PRIOR_WEIGHT_BIAS = 20.0

# Relevance determination of the pooled regression (MacKay's evidence updates): at most
# _ARD_ROUNDS rounds; each coefficient's prior precision (1 / its prior variance) kept in
# [_ARD_MIN, _ARD_MAX]. The lower bound says a coefficient's prior sd is at most 1 (features
# are mostly in [0, 1] and rewards in [0, 1]): without it, a fit of a few hundred rewards
# with nearly collinear features could give coefficients of ~10 and users a wild prior.
# The bias is never shrunk.
_ARD_ROUNDS = 30
_ARD_MIN, _ARD_MAX = 1.0, 1e8
_ARD_BIAS = 1e-3

# A population prior is refreshed as soon as the rewards learned since it was made reach
# this share of the rewards it pooled (besides the engine's timer, OO_PRIOR_REFRESH_S):
# while the prior is young, every few new rewards change it, and users should not wait
# for the timer to get them; once it is made of much data, the timer alone refreshes it.
# See docs/learning.md and ADR 0022.
PRIOR_REFRESH_GROWTH = 0.1


def prior_due(prior: PolicyState | None, rewards_since: int) -> bool:
    """Whether `prior` should be refreshed because the data grew: `rewards_since` (rewards
    learned since it was made) is at least PRIOR_REFRESH_GROWTH of the rewards it pooled
    (`prior.rewards`). Never for no prior: the first one comes from the timer."""
    return (
        prior is not None
        and prior.rewards > 0
        and rewards_since >= PRIOR_REFRESH_GROWTH * prior.rewards
    )


def _relevance_fit(xx: Matrix, xr: Vector, noise_var: float) -> Vector:
    """Bayesian ridge with one prior precision per coefficient, each set by maximising the
    evidence (automatic relevance determination; MacKay's fixed point
    alpha_j = gamma_j / mu_j^2, gamma_j = 1 - alpha_j Sigma_jj). Coefficients the data do
    not support are shrunk to 0 instead of fitted to noise, which is what a population
    prior built from little data needs. Returns the posterior mean."""
    dim = xr.shape[0]
    alpha = np.full(dim, _ARD_MIN)
    alpha[0] = _ARD_BIAS
    for _ in range(_ARD_ROUNDS):
        a_inv = np.linalg.inv(xx + noise_var * np.diag(alpha))
        mu = a_inv @ xr
        gamma = 1.0 - alpha * noise_var * np.diag(a_inv)
        new = np.clip(gamma / np.maximum(mu * mu, 1e-300), _ARD_MIN, _ARD_MAX)
        new[0] = _ARD_BIAS
        done = bool(np.all(np.abs(np.log(new / alpha)) < 1e-3))
        alpha = new
        if done:
            break
    return np.asarray(np.linalg.solve(xx + noise_var * np.diag(alpha), xr), dtype=np.float64)


def population_prior(
    states: Iterable[PolicyState],
    policy: str,
    feature_version: str,
    dim: int,
    ridge_lambda: float,
    *,
    max_weight: float | None = None,
) -> PolicyState | None:
    """The population prior of a policy: per arm, a regression of everyone's data pooled
    (each user's X'X and X'r without the prior it was learned under), with

    - each user's own intercept integrated out (a random effect of precision
      PRIOR_WEIGHT_BIAS, the same weight the prior's intercept gets in a user's model):
      the slopes are learned from how rewards vary within users and between users' facts,
      not from users' tastes, and a user who pulls an arm often does not dominate its mean;
    - one prior precision per coefficient set by the evidence (`_relevance_fit`), so that
      coefficients the pooled data do not support are 0 rather than noise.

    None when no arm has learned anything. Its arms start new users at A = C, b = C theta
    (see `ArmModel.fresh`), C = diag(lambda + w), w = 1 / (1/max_weight + 1/n) with n the
    rewards pooled: a prior made of little evidence weighs little, one made of much weighs
    up to max_weight (PRIOR_WEIGHT_BIAS for the bias, PRIOR_WEIGHT for the rest); existing
    users move onto it in `PolicyState.with_arms`. Its `rewards` is the number of rewards
    pooled (see `prior_due`)."""
    cap = PRIOR_WEIGHT if max_weight is None else max_weight
    cap_bias = PRIOR_WEIGHT_BIAS if max_weight is None else max_weight

    def strength(n: float) -> Vector:
        w = np.full(dim, 1.0 / (1.0 / cap + 1.0 / n) if cap else 0.0)
        w[0] = 1.0 / (1.0 / cap_bias + 1.0 / n) if cap_bias else 0.0
        return w

    # Per arm: the pooled X'X and X'r (users' intercepts integrated out), rewards, their sum.
    pooled: dict[str, tuple[Matrix, Vector, float, float]] = {}
    for state in states:
        if state.dim != dim:
            continue
        for arm, model in state.arms.items():
            if model.rewarded == 0:
                continue
            xx, xr = model.own(state.ridge_lambda)
            # Integrate out the user's intercept delta ~ N(0, 1/PRIOR_WEIGHT_BIAS) (x[0] = 1,
            # so X'1 is xx[:, 0] and n = xx[0, 0]): a Schur complement, exact for ridge.
            col = xx[:, 0].copy()
            k = xx[0, 0] + PRIOR_WEIGHT_BIAS
            xx = xx - np.outer(col, col) / k
            xr = xr - col * (xr[0] / k)
            a, b, n, total = pooled.get(arm, (np.zeros((dim, dim)), np.zeros(dim), 0.0, 0.0))
            pooled[arm] = (a + xx, b + xr, n + model.rewarded, total + model.reward_sum)
    if not pooled:
        return None
    arms = {}
    for arm, (xx, xr, n, total) in pooled.items():
        # The reward noise of 0/1 rewards, p(1 - p), Beta(1, 1)-smoothed; rewards in [-1, 1]
        # can put p outside [0, 1], hence the bounds.
        p = (total + 1.0) / (n + 2.0)
        noise_var = float(np.clip(p * (1.0 - p), 0.01, 0.25))
        theta = _relevance_fit(xx, xr, noise_var)
        arms[arm] = ArmModel.fresh(dim, ridge_lambda, theta, strength(n))
    return PolicyState(
        policy=policy,
        feature_version=feature_version,
        dim=dim,
        ridge_lambda=ridge_lambda,
        # The rewards pooled, which `prior_due` measures the data's growth against.
        rewards=int(sum(n for _, _, n, _ in pooled.values())),
        arms=arms,
    )

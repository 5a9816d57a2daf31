"""Contextual-bandit policies: pure functions of (state, x, arms, rng).

A policy never holds learned state: `select` reads a `PolicyState` and returns a
`Selection`; learning is `PolicyState.learned`, shared by every linear policy. The RNG is
made by the caller from the decision id, so a decision replays exactly.

Every selection carries each candidate's score and propensity (summing to 1) and whether
it explored. Ties in the greedy choice are broken at random among the tied candidates and
their propensity is split evenly, so even a deterministic policy reports honest
propensities for logged data; a deterministic policy without ties gives its choice
propensity 1 (see docs/policies.md for what that means for off-policy evaluation).

Every policy built by `build_policies` (but `uniform`) mixes in OO_MIN_EXPLORATION (m) of
uniform exploration (`_mixed`, ADR 0014): its logged propensities are (1 - m) p + m / K, so
no candidate ever has propensity 0 and off-policy estimates have support whichever
policy served. Shadows are built the same way: a shadow's propensities are those of the
target as it would be served.

Policies are chosen from `POLICIES` by name; `make_policy` builds one from config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from scipy.special import log_ndtr, ndtr

from oo_ml.config import ScoringConfig
from oo_ml.domain.features import FEATURE_VERSIONS, Vector
from oo_ml.domain.rng import Random
from oo_ml.domain.state import PolicyState

_TIE = 1e-12
# Thompson sampling's propensities for degenerate arms (non-finite, or widths below the
# means' resolution): P(arm a's draw is the largest), integrated over a grid of a's
# standard-normal draw u in [-8, 8] (quadrature error well under 0.01).
_TS_GRID = np.linspace(-8.0, 8.0, 801)
_TS_WEIGHTS = np.exp(-0.5 * _TS_GRID**2) / np.exp(-0.5 * _TS_GRID**2).sum()


@dataclass(frozen=True, slots=True)
class Selection:
    chosen: int
    scores: tuple[float, ...]
    propensities: tuple[float, ...]
    explored: bool


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def feature_version(self) -> str: ...

    @property
    def deterministic(self) -> bool: ...

    def select(
        self, state: PolicyState, x: Vector, arms: Sequence[str], rng: Random
    ) -> Selection: ...


def estimates(state: PolicyState, x: Vector, arms: Sequence[str]) -> npt.NDArray[np.float64]:
    """Each arm's ridge estimate theta_a . x: one matmul over the stacked arms."""
    theta = state.stacked().of(arms)[0]
    return np.asarray(theta @ x, dtype=np.float64)


def _widths(a_inv: npt.NDArray[np.float64], x: Vector) -> npt.NDArray[np.float64]:
    quad = (a_inv @ x) @ x
    return np.asarray(np.sqrt(np.maximum(quad, 0.0)), dtype=np.float64)


def widths(state: PolicyState, x: Vector, arms: Sequence[str]) -> npt.NDArray[np.float64]:
    """Each arm's sqrt(x' A^-1 x): the confidence width of its estimate at x."""
    return _widths(state.stacked().of(arms)[1], x)


_NOISE_SCALE = 1.0


def noise_sd(state: PolicyState, arms: Sequence[str]) -> npt.NDArray[np.float64]:
    """Each arm's reward noise, sqrt(p(1-p)) with p its smoothed mean reward (Beta(1, 1)):
    ridge's sqrt(x'A^-1 x) is the width for unit noise, too wide for 0/1 rewards."""
    return np.asarray(state.stacked().of(arms)[2], dtype=np.float64)


# Choosing among ten candidates is cheap arithmetic, but every NumPy call on a small array
# costs microseconds of dispatch, several times more between requests (cold caches) than
# in a benchmark loop. So the choice works on the scores as a Python list with C builtins
# (sum, sorted, index: no loop over arms in Python, only over near-ties), and the
# propensities of a policy with two levels (the greedy set and the rest) are written as
# two numbers. ADR 0028.


def _greedy_array(scores: npt.NDArray[np.float64]) -> tuple[int, ...]:
    return tuple(np.flatnonzero(scores >= scores.max() - _TIE).tolist())


def _greedy(scores: list[float]) -> tuple[int, ...]:
    """The candidates within _TIE of the top score, in order (the top alone, mostly)."""
    total = sum(scores)
    if math.isnan(total):  # a NaN (or inf - inf): NumPy's comparisons, as before
        return _greedy_array(np.asarray(scores, dtype=np.float64))
    ranked = sorted(scores)
    top = ranked[-1]
    cut = top - _TIE
    if len(ranked) == 1 or ranked[-2] < cut:
        return (scores.index(top),)
    if ranked[0] >= cut:
        return tuple(range(len(scores)))  # all tied (a new user, no prior)
    return _greedy_array(np.asarray(scores, dtype=np.float64))


def _selection(
    chosen: int,
    scores: list[float],
    best: tuple[int, ...],
    explored: bool,
    *,
    p_best: float,
    p_rest: float,
    m: float,
    rng: Random,
) -> Selection:
    """The selection of a policy whose propensities are p_best on the greedy set and p_rest
    elsewhere, with uniform exploration m mixed in (see `_mixed`: the same draws and the
    same arithmetic, so the same bits)."""
    k = len(scores)
    if m > 0.0:
        p_best = (1.0 - m) * p_best + m / k
        p_rest = (1.0 - m) * p_rest + m / k
        if rng.random() < m:
            redrawn = int(rng.integers(k))
            explored = explored or redrawn != chosen
            chosen = redrawn
    if len(best) == k:  # all tied (a new user, no prior)
        props = [p_best] * k
    else:
        props = [p_rest] * k
        for i in best:  # the top, and the rare near-ties
            props[i] = p_best
    return Selection(
        chosen=chosen, scores=tuple(scores), propensities=tuple(props), explored=explored
    )


def _mixed(
    chosen: int,
    scores: npt.NDArray[np.float64],
    props: npt.NDArray[np.float64],
    explored: bool,
    *,
    m: float,
    rng: Random,
) -> Selection:
    """The selection with uniform exploration m mixed in (OO_MIN_EXPLORATION, ADR 0014):
    with probability m the choice is redrawn uniformly, and every propensity becomes
    (1 - m) p + m / K, which is exactly the chance the mixed policy picks that arm. The two
    draws come after the policy's own, from the same decision RNG, so decisions replay.
    `explored` is also true when the uniform draw picked an arm other than the policy's.
    Whole arrays, no loop over arms."""
    if m > 0.0:
        k = len(props)
        props = (1.0 - m) * props + m / k
        if rng.random() < m:
            redrawn = int(rng.integers(k))
            explored = explored or redrawn != chosen
            chosen = redrawn
    return Selection(
        chosen=chosen,
        scores=tuple(scores.tolist()),
        propensities=tuple(props.tolist()),
        explored=explored,
    )


@dataclass(frozen=True, slots=True)
class EpsilonGreedy:
    name: str
    feature_version: str
    epsilon: float
    min_exploration: float = 0.0
    deterministic: bool = False

    def select(self, state: PolicyState, x: Vector, arms: Sequence[str], rng: Random) -> Selection:
        scores = (state.stacked().of(arms)[0] @ x).tolist()
        k, eps = len(scores), self.epsilon
        best = _greedy(scores)
        explore = rng.random() < eps
        chosen = int(rng.integers(k)) if explore else best[int(rng.integers(len(best)))]
        p_rest = eps / k
        p_best = p_rest + (1.0 - eps) / len(best)
        return _selection(
            chosen,
            scores,
            best,
            chosen not in best,
            p_best=p_best,
            p_rest=p_rest,
            m=self.min_exploration,
            rng=rng,
        )


@dataclass(frozen=True, slots=True)
class LinUCB:
    name: str
    feature_version: str
    alpha: float
    min_exploration: float = 0.0

    @property
    def deterministic(self) -> bool:
        """Deterministic (up to ties) only without the mixed-in uniform exploration."""
        return self.min_exploration <= 0.0

    def select(self, state: PolicyState, x: Vector, arms: Sequence[str], rng: Random) -> Selection:
        theta, a_inv, sd = state.stacked().of(arms)
        mean = theta @ x
        ucb = (mean + self.alpha * _NOISE_SCALE * sd * _widths(a_inv, x)).tolist()
        best = _greedy(ucb)
        chosen = best[int(rng.integers(len(best)))]
        # The bonus, not the estimate, made the choice.
        explored = chosen not in _greedy(mean.tolist())
        return _selection(
            chosen,
            ucb,
            best,
            explored,
            p_best=1.0 / len(best),
            p_rest=0.0,
            m=self.min_exploration,
            rng=rng,
        )


@dataclass(frozen=True, slots=True)
class LinearThompson:
    name: str
    feature_version: str
    scale: float
    min_exploration: float = 0.0
    deterministic: bool = False

    def select(self, state: PolicyState, x: Vector, arms: Sequence[str], rng: Random) -> Selection:
        mean = estimates(state, x, arms)
        # theta_a ~ N(A^-1 b, v^2 A^-1) gives x.theta_a ~ N(mean_a, v^2 x'A^-1 x): sampling the
        # scalar is exact and needs no Cholesky factor.
        sd = self.scale * widths(state, x, arms)
        draw = mean + sd * rng.standard_normal(len(arms))
        chosen = int(draw.argmax())
        props = _thompson_propensities(mean, sd)
        if props[chosen] <= 0.0:  # out in the numerical tail: never log a zero for the choice
            props[chosen] = 1e-12
            props /= props.sum()
        explored = chosen not in _greedy(mean.tolist())
        return _mixed(chosen, draw, props, explored, m=self.min_exploration, rng=rng)


def _thompson_propensities(
    mean: npt.NDArray[np.float64], sd: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """P(mean_a + sd_a Z_a is the largest), independent normals: for each arm, the integral
    over the value t of its density times the others' normal CDFs at t.

    On one grid of t shared by every arm, spaced a `_TS_STEPS_PER_SD`-th of the narrowest
    width that matters (`_integrated`): K x G log-CDF evaluations instead of K x K x 801
    (about 60 us instead of 1.2 ms for ten arms of equal widths). Widths too far apart for a grid of `_TS_SHARED_MAX` points are integrated in
    pieces (`_thompson_propensities_in_pieces`)."""
    sd = np.maximum(sd, 1e-9)
    # Below the highest of the arms' lower tails, some arm's CDF (or the arm's density) is
    # nil: no arm can be the largest there.
    lo = float((mean - 8.0 * sd).max())
    hi = float((mean + 8.0 * sd).max())
    reaching = mean + 8.0 * sd >= lo
    span = hi - lo
    if not (math.isfinite(span) and span > 0.0 and reaching.any()):
        # Non-finite means or widths, or widths below the means' resolution: the per-arm
        # grid gives what it always gave.
        return _thompson_propensities_per_arm(mean, sd)
    points = math.ceil(span / (float(sd[reaching].min()) / _TS_STEPS_PER_SD)) + 1
    if points > _TS_SHARED_MAX:
        return _thompson_propensities_in_pieces(mean, sd, lo, hi, reaching)
    return _integrated(mean, sd, np.linspace(lo, hi, points), None)


def _integrated(
    mean: npt.NDArray[np.float64],
    sd: npt.NDArray[np.float64],
    t: npt.NDArray[np.float64],
    w: npt.NDArray[np.float64] | None,
) -> npt.NDArray[np.float64]:
    """Each arm's density times the others' CDFs, summed over the values `t` with weights
    `w` (None: equal, an evenly spaced grid), normalised. The others' CDFs are one sum of
    log-CDFs less the arm's own."""
    z = (t[np.newaxis, :] - mean[:, np.newaxis]) / sd[:, np.newaxis]
    # Floored: a CDF below e^-10000 is nil all the same, and the sum less one term stays
    # exact where one arm's log-CDF would otherwise swamp the others'.
    log_cdf = np.maximum(log_ndtr(z), -1e4)
    others = np.exp(log_cdf.sum(axis=0)[np.newaxis, :] - log_cdf)
    terms = np.exp(-0.5 * z * z) / sd[:, np.newaxis] * others
    props = terms.sum(axis=1) if w is None else terms @ w
    return np.asarray(props / props.sum(), dtype=np.float64)


_TS_STEPS_PER_SD = 4.0
_TS_SHARED_MAX = 4001
# Widths far apart: each arm's window [mean - 8 sd, mean + 8 sd] cut every quarter of its
# width, and a 4-point Gauss-Legendre rule on every piece between the arms' cuts.
_TS_CUTS = np.linspace(-8.0, 8.0, 65)
_TS_GL_NODES, _TS_GL_WEIGHTS = np.polynomial.legendre.leggauss(4)


def _thompson_propensities_in_pieces(
    mean: npt.NDArray[np.float64],
    sd: npt.NDArray[np.float64],
    lo: float,
    hi: float,
    reaching: npt.NDArray[np.bool_],
) -> npt.NDArray[np.float64]:
    """The same integral as `_thompson_propensities`, for widths too far apart for one
    uniform grid (a narrow arm next to a wide one). Each factor of the integrand (an arm's
    density or CDF) varies only within its arm's window, on the scale of its width, so
    cutting [lo, hi] at every arm's quarter-widths leaves pieces on which every factor is
    smooth at the piece's scale, and a 4-point Gauss rule per piece integrates them. A grid
    per arm in its own draw (`_thompson_propensities_per_arm`) cannot: a narrow arm's CDF
    is a step on a wide arm's grid, and missed by up to a grid step (1.2e-3 for widths
    1,000 apart). Falls back to that grid when an arm's cuts collapse (a width below its
    mean's floating-point resolution; only arms that reach [lo, hi] matter: one far below
    it, never the largest, may have any width)."""
    cuts = mean[:, np.newaxis] + sd[:, np.newaxis] * _TS_CUTS[np.newaxis, :]
    if not bool((np.diff(cuts[reaching], axis=1) > 0.0).all()):
        return _thompson_propensities_per_arm(mean, sd)
    edges = np.unique(np.concatenate(([lo, hi], cuts[(cuts > lo) & (cuts < hi)])))
    mid = 0.5 * (edges[1:] + edges[:-1])
    half = 0.5 * (edges[1:] - edges[:-1])
    t = (mid[:, np.newaxis] + half[:, np.newaxis] * _TS_GL_NODES[np.newaxis, :]).ravel()
    w = (half[:, np.newaxis] * _TS_GL_WEIGHTS[np.newaxis, :]).ravel()
    return _integrated(mean, sd, t, w)


def _thompson_propensities_per_arm(
    mean: npt.NDArray[np.float64], sd: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """The same integral over a grid of each arm's own standard-normal draw u in [-8, 8]
    (any widths; K x K x 801 CDF evaluations)."""
    # values[a, g]: arm a's draw at grid point g.
    values = mean[:, np.newaxis] + sd[:, np.newaxis] * _TS_GRID[np.newaxis, :]
    # cdf[a, b, g] = P(arm b's draw < arm a's value at g)
    cdf = ndtr(
        (values[:, np.newaxis, :] - mean[np.newaxis, :, np.newaxis]) / sd[np.newaxis, :, np.newaxis]
    )
    k = len(mean)
    cdf[np.arange(k), np.arange(k), :] = 1.0
    props = np.asarray(cdf.prod(axis=1) @ _TS_WEIGHTS, dtype=np.float64)
    return np.asarray(props / props.sum(), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Uniform:
    name: str
    feature_version: str
    deterministic: bool = False

    def select(self, state: PolicyState, x: Vector, arms: Sequence[str], rng: Random) -> Selection:
        k = len(arms)
        return Selection(
            chosen=int(rng.integers(k)),
            scores=tuple(estimates(state, x, arms).tolist()),
            propensities=(1.0 / k,) * k,
            explored=True,
        )


PolicyFactory = Callable[[ScoringConfig], Policy]

POLICIES: dict[str, PolicyFactory] = {
    "egreedy": lambda c: EpsilonGreedy("egreedy", "v1", c.epsilon, c.min_exploration),
    "egreedy-v2": lambda c: EpsilonGreedy("egreedy-v2", "v2", c.epsilon, c.min_exploration),
    "linucb": lambda c: LinUCB("linucb", "v2", c.linucb_alpha, c.min_exploration),
    "lints": lambda c: LinearThompson("lints", "v2", c.thompson_scale, c.min_exploration),
    # Uniform needs no mixing: it already explores uniformly.
    "uniform": lambda c: Uniform("uniform", "v1"),
}


def build_policies(config: ScoringConfig) -> dict[str, Policy]:
    policies = {name: factory(config) for name, factory in POLICIES.items()}
    for p in policies.values():
        if p.feature_version not in FEATURE_VERSIONS:
            raise ValueError(f"policy {p.name} needs unknown feature version {p.feature_version}")
    return policies

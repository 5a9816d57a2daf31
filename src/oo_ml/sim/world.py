"""The simulator's synthetic world: personas, contexts and rewards, drawn from a seed.

The synthetic world
-------------------
Four tip families compete: `focus`, `break`, `plan`, `review`. Each user has a fixed
profile drawn once from the seed: a chronotype (a preferred hour around 9:00 or 20:00),
a completion rate and a dismiss rate (Beta), a mean dwell (log-normal), a typical task
load (open tasks ~ Poisson with a log-normal mean, a Beta share of them overdue), a
starting tip volume, and an unobserved taste for each arm (normal, on the logit scale).

A round is one step of time: every user who has joined is served one decision. Users
join evenly over the first `arrival_fraction` of the rounds, so later users start cold
and lean on the population prior, as new users of the server do. Each decision's context
is drawn afresh: the hour is near the user's preferred hour half of the time and
uniform over 7:00-22:59 otherwise, the weekday is uniform, and the open and overdue
tasks are drawn from the user's load. The tip volume grows by one per decision.

The probability that a tip is completed (reward 1, else 0) is a logistic function of
the context, the profile and the taste:

    focus   helps at the user's preferred hour and for users who complete tips,
            hurts when a large share of the tasks is overdue;
    break   helps in the afternoon and under a heavy open-task load;
    plan    helps when many tasks are overdue, and on Mondays;
    review  helps in the evening, for users who complete tips.

The world is deliberately not linear in the policies' features (it uses the overdue
*share* and the user's hour gap, and an unobserved per-user taste), so no policy's model
is exactly right, and the best arm changes with the context. The oracle knows the
probabilities and always picks the best arm; regret is measured against it in
expectation (the gap in probability, not in the drawn rewards).

Common random numbers: the whole world (profiles, contexts, and for every decision one
uniform draw per arm, reward = draw < p) is drawn from the seed before any policy runs.
Every policy therefore sees the same users and contexts, and two policies that choose the
same arm for the same decision get the same reward; the policies' own RNG is the
server's `rng_for(decision_id)`, with decision ids made from the seed, round and user.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from oo_ml.domain.features import FEATURE_VERSIONS, Inputs, assemble
from oo_ml.schema.contracts import ALL_FEATURES

ARMS: tuple[str, ...] = ("focus", "break", "plan", "review")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    users: int = 50
    """Users in the synthetic population."""
    rounds: int = 300
    """Steps of time; in each, every user who has joined is served one decision."""
    seed: int = 1
    """Seeds the whole world and, through the decision ids, every policy's RNG."""
    taste_sd: float = 0.5
    """Spread of each user's unobserved taste for each arm, on the logit scale."""
    arrival_fraction: float = 0.25
    """Users join evenly over this fraction of the rounds (0: all in round 0)."""
    prior_every: int = 10
    """Rounds between refreshes of the population priors (0: no priors)."""
    last_rounds: int = 50
    """Window, in rounds, of the best-arm rate."""
    evening_share: float = 0.5
    """Share of users whose preferred hour is in the evening (the rest: morning)."""

    def __post_init__(self) -> None:
        problems = []
        if self.users < 1 or self.rounds < 1:
            problems.append(f"users and rounds must be >= 1 (got {self.users}, {self.rounds})")
        if not 0 <= self.arrival_fraction < 1:
            problems.append(f"arrival_fraction must be in [0, 1) (got {self.arrival_fraction})")
        if self.taste_sd < 0 or self.prior_every < 0 or self.last_rounds < 1:
            problems.append("taste_sd and prior_every must be >= 0, last_rounds >= 1")
        if problems:
            raise ValueError("; ".join(problems))


# -- the world ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class World:
    """Everything random about a run, drawn from the seed before any policy acts.
    Arrays are indexed [round, user] (and arm last)."""

    config: SimulationConfig
    joined: IntArray
    """The round each user joins in."""
    x: Mapping[str, FloatArray]
    """Per feature version, (rounds, users, D)."""
    p: FloatArray
    """(rounds, users, K): reward probability of each arm."""
    draws: FloatArray
    """(rounds, users, K): the uniform draw deciding each arm's reward (reward = draw < p)."""
    profile: Mapping[str, FloatArray] = field(default_factory=dict)
    """Per-user profile values, (users,) each: `evening` (1.0 or 0.0), `preferred_hour`,
    `completion`, `load`, `overdue_rate`. For grouping users into personas in reports."""

    @property
    def best(self) -> IntArray:
        return np.asarray(self.p.argmax(axis=2), dtype=np.int64)

    def reward(self, r: int, u: int, arm: int) -> float:
        return 1.0 if self.draws[r, u, arm] < self.p[r, u, arm] else 0.0


def _sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)


def _cos_hours(hour: FloatArray, centre: FloatArray | float) -> FloatArray:
    return np.asarray(np.cos((hour - centre) / 24.0 * 2.0 * math.pi), dtype=np.float64)


def make_world(config: SimulationConfig) -> World:
    rng = np.random.default_rng(config.seed)
    n, t, k = config.users, config.rounds, len(ARMS)
    # Profiles.
    evening = rng.random(n) < config.evening_share
    preferred = np.clip(np.rint(np.where(evening, 20.0, 9.0) + rng.normal(0, 1.0, n)), 0, 23)
    completion = rng.beta(2.0, 5.0, n)
    dismiss = rng.beta(2.0, 5.0, n) * (1.0 - completion)
    dwell_ms = np.exp(rng.normal(math.log(8000.0), 0.6, n))
    load = np.exp(rng.normal(math.log(8.0), 0.8, n))
    overdue_rate = rng.beta(2.0, 6.0, n)
    volume0 = rng.integers(0, 200, n)
    taste = rng.normal(0.0, config.taste_sd, (n, k))
    joined = np.floor(np.arange(n) * config.arrival_fraction * t / n).astype(np.int64)
    # Contexts, one per (round, user).
    near = rng.random((t, n)) < 0.5
    hour = np.where(
        near,
        np.mod(np.rint(preferred + rng.normal(0, 2.0, (t, n))), 24),
        rng.integers(7, 23, (t, n)),
    ).astype(np.float64)
    weekday = rng.integers(0, 7, (t, n)).astype(np.float64)
    open_tasks = rng.poisson(np.broadcast_to(load, (t, n))).astype(np.float64)
    overdue = rng.binomial(open_tasks.astype(np.int64), overdue_rate).astype(np.float64)
    draws = rng.random((t, n, k))
    # Reward probabilities.
    share = overdue / np.maximum(open_tasks, 1.0)
    busy = np.minimum(np.log1p(open_tasks) / math.log1p(40.0), 1.0)
    cr = completion - 0.3
    logits = np.stack(
        [
            -0.9 + 1.1 * _cos_hours(hour, preferred) + 2.0 * cr - 2.0 * share,  # focus
            -1.7 + 0.8 * _cos_hours(hour, 15.0) + 1.4 * busy,  # break
            -1.8 + 3.0 * share + 0.6 * (weekday == 0),  # plan
            -1.0 + 1.2 * _cos_hours(hour, 21.0) + 1.5 * cr,  # review
        ],
        axis=2,
    )
    p = _sigmoid(logits + taste[np.newaxis, :, :])
    # Features, assembled and vectorised as the server does for a request carrying them.
    xs = {v: np.zeros((t, n, fv.dim)) for v, fv in FEATURE_VERSIONS.items()}
    for r in range(t):
        for u in range(n):
            if r < joined[u]:
                continue
            values: dict[str, float | None] = {
                "hour_of_day": hour[r, u],
                "day_of_week": weekday[r, u],
                "open_tasks": open_tasks[r, u],
                "overdue_tasks": overdue[r, u],
                "completion_rate_30d": completion[u],
                "dismiss_rate_30d": dismiss[u],
                "mean_dwell_ms_30d": dwell_ms[u],
                "preferred_hour": preferred[u],
                "tip_volume_30d": float(volume0[u] + r - joined[u]),
            }
            assembled = assemble(ALL_FEATURES, Inputs(values), {}, now=0.0)
            for v, fv in FEATURE_VERSIONS.items():
                xs[v][r, u] = fv.vectorise(assembled)
    profile = {
        "evening": evening.astype(np.float64),
        "preferred_hour": preferred,
        "completion": completion,
        "load": load,
        "overdue_rate": overdue_rate,
    }
    return World(config=config, joined=joined, x=xs, p=p, draws=draws, profile=profile)


def decision_id(seed: int, r: int, u: int) -> str:
    return f"sim{seed}-r{r}-u{u}"


def user_id(u: int) -> str:
    return f"user{u}"

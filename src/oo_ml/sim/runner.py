"""Offline simulator: the policies on a synthetic population, with common random numbers.

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

Policies run exactly as in the server: per-user `PolicyState`s in plain dicts, `select`
with the decision's RNG, `chose`, then `learned` with the reward; population priors are
refreshed every `prior_every` rounds with the engine's rule. One policy's decisions can be
logged (x per feature version, propensities, reward) and replayed through another policy
as a shadow, the way the server's shadows see traffic, for off-policy evaluation (`gate`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from oo_ml.config import ScoringConfig
from oo_ml.domain import ope as gate
from oo_ml.domain import promotion
from oo_ml.domain.features import FEATURE_VERSIONS, Inputs, Vector, assemble
from oo_ml.domain.policies import Policy, build_policies, estimates
from oo_ml.domain.rng import rng_for
from oo_ml.domain.state import PolicyState, empty_state, population_prior
from oo_ml.schema.contracts import ALL_FEATURES

ARMS: tuple[str, ...] = ("focus", "break", "plan", "review")
ORACLE = "oracle"

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


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    feature_version: str
    decisions: int
    mean_reward: float
    """Mean of the drawn rewards."""
    expected_reward: float
    """Mean over decisions of sum_a propensity(a) p(a): the policy's true value, without the
    noise of its own draws or of the rewards. What off-policy estimators estimate."""
    cumulative_regret: float
    """Sum over decisions of p(best arm) - p(chosen arm)."""
    best_arm_rate: float
    """Share of the decisions of the last `last_rounds` rounds that chose the best arm."""
    explored_rate: float


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """One decision of the logging policy, as the server's decision log keeps it, plus
    `true_p`: the world's reward probability of every arm, which no real log has."""

    decision_id: str
    user_id: str
    round: int
    x: Mapping[str, Vector]
    """The context vectorised under every feature version."""
    arms: tuple[str, ...]
    chosen: int
    propensities: tuple[float, ...]
    reward: float
    true_p: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class SimulationResult:
    config: SimulationConfig
    oracle: PolicyResult
    policies: tuple[PolicyResult, ...]
    log_policy: str | None = None
    log: tuple[LoggedDecision, ...] = ()

    def result(self, policy: str) -> PolicyResult:
        if policy == ORACLE:
            return self.oracle
        for r in self.policies:
            if r.policy == policy:
                return r
        raise KeyError(policy)


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


# -- running policies --------------------------------------------------------------------


def decision_id(seed: int, r: int, u: int) -> str:
    return f"sim{seed}-r{r}-u{u}"


def user_id(u: int) -> str:
    return f"user{u}"


@dataclass(slots=True)
class _Tally:
    decisions: int = 0
    rewards: float = 0.0
    expected: float = 0.0
    regret: float = 0.0
    late: int = 0
    late_best: int = 0
    explored: int = 0

    def add(
        self,
        world: World,
        r: int,
        u: int,
        *,
        arm: int,
        reward: float,
        propensities: Sequence[float],
        explored: bool,
    ) -> None:
        p = world.p[r, u]
        best = int(p.argmax())
        self.decisions += 1
        self.rewards += reward
        self.expected += float(np.dot(propensities, p))
        self.regret += float(p[best] - p[arm])
        self.explored += int(explored)
        if r >= world.config.rounds - world.config.last_rounds:
            self.late += 1
            self.late_best += int(arm == best)

    def result(self, policy: str, feature_version: str) -> PolicyResult:
        n = max(self.decisions, 1)
        return PolicyResult(
            policy=policy,
            feature_version=feature_version,
            decisions=self.decisions,
            mean_reward=self.rewards / n,
            expected_reward=self.expected / n,
            cumulative_regret=self.regret,
            best_arm_rate=self.late_best / max(self.late, 1),
            explored_rate=self.explored / n,
        )


def _served(world: World) -> Iterable[tuple[int, int]]:
    for r in range(world.config.rounds):
        for u in range(world.config.users):
            if r >= world.joined[u]:
                yield r, u


def _run_oracle(world: World) -> PolicyResult:
    tally = _Tally()
    for r, u in _served(world):
        arm = int(world.p[r, u].argmax())
        one_hot = np.eye(len(ARMS))[arm].tolist()
        reward = world.reward(r, u, arm)
        tally.add(world, r, u, arm=arm, reward=reward, propensities=one_hot, explored=False)
    return tally.result(ORACLE, "-")


def _run_policy(
    world: World, policy: Policy, ridge_lambda: float, log: list[LoggedDecision] | None
) -> PolicyResult:
    cfg = world.config
    fv = FEATURE_VERSIONS[policy.feature_version]
    states: dict[int, PolicyState] = {}
    prior: PolicyState | None = None
    tally = _Tally()
    arms = list(ARMS)
    for r in range(cfg.rounds):
        if cfg.prior_every and r and r % cfg.prior_every == 0:
            fv = FEATURE_VERSIONS[policy.feature_version]
            prior = (
                population_prior(states.values(), policy.name, fv.name, fv.dim, ridge_lambda)
                or prior
            )
        for u in range(cfg.users):
            if r < world.joined[u]:
                continue
            state = states.get(u) or empty_state(policy.name, fv.name, fv.dim, ridge_lambda)
            state = state.with_arms(arms, prior)
            x = world.x[fv.name][r, u]
            did = decision_id(cfg.seed, r, u)
            sel = policy.select(state, x, arms, rng_for(did))
            reward = world.reward(r, u, sel.chosen)
            states[u] = state.chose(arms[sel.chosen]).learned(arms[sel.chosen], x, reward)
            tally.add(
                world,
                r,
                u,
                arm=sel.chosen,
                reward=reward,
                propensities=sel.propensities,
                explored=sel.explored,
            )
            if log is not None:
                log.append(
                    LoggedDecision(
                        decision_id=did,
                        user_id=user_id(u),
                        round=r,
                        x={v: world.x[v][r, u] for v in FEATURE_VERSIONS},
                        arms=ARMS,
                        chosen=sel.chosen,
                        propensities=sel.propensities,
                        reward=reward,
                        true_p=tuple(world.p[r, u].tolist()),
                    )
                )
    return tally.result(policy.name, policy.feature_version)


def _policies(names: Sequence[str], scoring: ScoringConfig) -> dict[str, Policy]:
    known = build_policies(scoring)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {sorted(known)}")
    return {n: known[n] for n in names}


def simulate(
    config: SimulationConfig,
    policies: Sequence[str],
    scoring: ScoringConfig | None = None,
    *,
    log_policy: str | None = None,
) -> SimulationResult:
    """Run each named policy on the same world; log `log_policy`'s decisions."""
    scoring = scoring or ScoringConfig()
    names = list(dict.fromkeys([*policies, *([log_policy] if log_policy else [])]))
    built = _policies(names, scoring)
    world = make_world(config)
    log: list[LoggedDecision] = []
    results = tuple(
        _run_policy(world, p, scoring.ridge_lambda, log if p.name == log_policy else None)
        for p in built.values()
    )
    return SimulationResult(
        config=config,
        oracle=_run_oracle(world),
        policies=results,
        log_policy=log_policy,
        log=tuple(log),
    )


# -- off-policy evaluation on the log ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShadowReplay:
    """A target policy's view of every logged decision, as the server's shadows get it."""

    policy: str
    propensities: FloatArray
    """(n, K): the target's propensity of each candidate."""
    estimates: FloatArray
    """(n, K): the target model's reward estimate of each candidate, before learning."""

    def value_on(self, log: Sequence[LoggedDecision]) -> float:
        """The target's true expected reward on the logged contexts: sum_a pi(a) p(a),
        averaged. What IPS and DR estimate; only a simulator knows it."""
        true_p = np.array([d.true_p for d in log], dtype=np.float64)
        return float((self.propensities * true_p).sum(axis=1).mean()) if log else 0.0


def replay(
    log: Sequence[LoggedDecision], policy: str, scoring: ScoringConfig | None = None
) -> ShadowReplay:
    """Run `policy` as a shadow over the log, in order: it selects with the shadow's RNG
    (`rng_for(decision_id, policy)`) and learns from the logged arm and reward without
    counting a pull, as `ScoringEngine` does. Like the engine's shadows, it has no
    population prior (shadow learning does not count rewards, which the prior weighs by)."""
    scoring = scoring or ScoringConfig()
    target = _policies([policy], scoring)[policy]
    fv = FEATURE_VERSIONS[target.feature_version]
    states: dict[str, PolicyState] = {}
    props = np.zeros((len(log), len(ARMS)))
    ests = np.zeros((len(log), len(ARMS)))
    for i, d in enumerate(log):
        arms = list(d.arms)
        state = states.get(d.user_id) or empty_state(
            target.name, fv.name, fv.dim, scoring.ridge_lambda
        )
        state = state.with_arms(arms)
        x = d.x[fv.name]
        sel = target.select(state, x, arms, rng_for(d.decision_id, target.name))
        props[i] = sel.propensities
        ests[i] = estimates(state, x, arms)
        arm = arms[d.chosen]
        model = state.arms[arm].learn(x, d.reward)
        old = state.arms[arm]
        model = replace(model, rewarded=old.rewarded, reward_sum=old.reward_sum)
        states[d.user_id] = replace(state, arms={**state.arms, arm: model})
    return ShadowReplay(policy=target.name, propensities=props, estimates=ests)


def off_policy_estimate(
    log: Sequence[LoggedDecision], shadow: ShadowReplay
) -> gate.OffPolicyEstimate:
    return gate.estimate(
        shadow.policy,
        target_propensities=shadow.propensities,
        estimates=shadow.estimates,
        logged_index=np.array([d.chosen for d in log], dtype=np.intp),
        logged_propensity=np.array([d.propensities[d.chosen] for d in log], dtype=np.float64),
        rewards=np.array([d.reward for d in log], dtype=np.float64),
    )


@dataclass(frozen=True, slots=True)
class Evaluation:
    estimate: gate.OffPolicyEstimate
    value_on_log: float
    """The target's true expected reward on the logged contexts (see `ShadowReplay`)."""
    online: PolicyResult
    """The target's own run on the same world."""
    decision: promotion.GateDecision


@dataclass(frozen=True, slots=True)
class Report:
    simulation: SimulationResult
    evaluations: tuple[Evaluation, ...] = ()
    min_samples: int = promotion.DEFAULT_MIN_SAMPLES
    margin: float = 0.0


def simulate_and_evaluate(
    config: SimulationConfig,
    policies: Sequence[str],
    scoring: ScoringConfig | None = None,
    *,
    log_policy: str | None = None,
    evaluate: Sequence[str] = (),
    min_samples: int = promotion.DEFAULT_MIN_SAMPLES,
    margin: float = 0.0,
) -> Report:
    """Simulate, then evaluate each of `evaluate` off-policy on `log_policy`'s log and run
    the promotion gate on it against the logging policy's mean on the same log."""
    if evaluate and not log_policy:
        raise ValueError("evaluating a policy needs a logging policy")
    names = list(dict.fromkeys([*policies, *evaluate]))
    sim = simulate(config, names, scoring, log_policy=log_policy)
    evaluations = []
    for name in evaluate:
        shadow = replay(sim.log, name, scoring)
        est = off_policy_estimate(sim.log, shadow)
        evaluations.append(
            Evaluation(
                estimate=est,
                value_on_log=shadow.value_on(sim.log),
                online=sim.result(name),
                decision=promotion.promote(
                    est,
                    est.served_mean,
                    min_samples=min_samples,
                    margin=margin,
                    served=str(log_policy),
                ),
            )
        )
    return Report(sim, tuple(evaluations), min_samples, margin)


def render(report: Report) -> str:
    """The report as text tables, for the CLI."""
    sim = report.simulation
    cfg = sim.config
    lines = [
        f"{cfg.users} users joining over the first {cfg.arrival_fraction:.0%} of {cfg.rounds}"
        f" rounds (one decision per joined user per round: {sim.oracle.decisions} decisions a"
        f" policy), seed {cfg.seed}.",
        "value: true expected reward of the policy's propensities; regret: vs the oracle, in"
        " expectation;",
        f"best arm: share of the oracle's choice over the last {cfg.last_rounds} rounds.",
        "",
        f"{'policy':<12} {'fv':<3} {'decisions':>9} {'mean reward':>11} {'value':>8}"
        f" {'regret':>9} {'best arm':>8} {'explored':>8}",
    ]
    for r in (sim.oracle, *sim.policies):
        lines.append(
            f"{r.policy:<12} {r.feature_version:<3} {r.decisions:>9} {r.mean_reward:>11.4f}"
            f" {r.expected_reward:>8.4f} {r.cumulative_regret:>9.1f} {r.best_arm_rate:>8.3f}"
            f" {r.explored_rate:>8.3f}"
        )
    if sim.log and not report.evaluations:
        lines += ["", f"logged {len(sim.log)} decisions of {sim.log_policy}"]
    if report.evaluations:
        served = report.evaluations[0].estimate.served_mean
        lines += [
            "",
            f"off-policy evaluation on {sim.log_policy}'s log ({len(sim.log)} decisions,"
            f" logged mean reward {served:.4f})",
            f"{'policy':<12} {'IPS':>7} {'SNIPS':>7} {'DR':>7} {'DR 95% CI':>17}"
            f" {'true on log':>11} {'online value':>12}",
        ]
        for e in report.evaluations:
            est = e.estimate
            ci = f"[{est.dr_ci_low:.4f}, {est.dr_ci_high:.4f}]"
            lines.append(
                f"{est.policy:<12} {est.ips:>7.4f} {est.snips:>7.4f} {est.dr:>7.4f} {ci:>17}"
                f" {e.value_on_log:>11.4f} {e.online.expected_reward:>12.4f}"
            )
        lines += ["", f"gate (min samples {report.min_samples}, margin {report.margin}):"]
        lines += [f"  {e.decision.reason}" for e in report.evaluations]
    return "\n".join(lines)

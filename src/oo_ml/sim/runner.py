"""The simulator's runs: every policy on the same world (`sim.world`), exactly as in the
server.

Policies run exactly as in the server: per-user `PolicyState`s in plain dicts, `select`
with the decision's RNG, `chose`, then `learned` with the reward; population priors are
refreshed with the engine's rules: every `prior_every` rounds (its timer) and as soon as
the rewards learned since the last refresh reach a tenth of those the prior pooled
(`state.prior_due`). One policy's decisions can be
logged (x per feature version, propensities, reward) and replayed through another policy
as a shadow, the way the server's shadows see traffic, for off-policy evaluation (`gate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from oo_ml.config import ScoringConfig
from oo_ml.domain import ope as gate
from oo_ml.domain import promotion
from oo_ml.domain.features import FEATURE_VERSIONS, Vector
from oo_ml.domain.policies import Policy, build_policies, estimates
from oo_ml.domain.rng import rng_for
from oo_ml.domain.state import PolicyState, empty_state, population_prior, prior_due
from oo_ml.sim.world import ARMS, SimulationConfig, World, decision_id, make_world, user_id

ORACLE = "oracle"

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


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


# -- running policies --------------------------------------------------------------------


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
    world: World,
    policy: Policy,
    ridge_lambda: float,
    log: list[LoggedDecision] | None,
    values: FloatArray | None = None,
) -> PolicyResult:
    cfg = world.config
    fv = FEATURE_VERSIONS[policy.feature_version]
    states: dict[int, PolicyState] = {}
    prior: PolicyState | None = None
    tally = _Tally()
    arms = list(ARMS)
    learned = 0  # rewards learned since the prior was made
    for r in range(cfg.rounds):
        # The engine's two triggers: its timer (every `prior_every` rounds here) and the
        # data's growth (`prior_due`, checked here once a round).
        if cfg.prior_every and r and (r % cfg.prior_every == 0 or prior_due(prior, learned)):
            fv = FEATURE_VERSIONS[policy.feature_version]
            prior = (
                population_prior(states.values(), policy.name, fv.name, fv.dim, ridge_lambda)
                or prior
            )
            learned = 0
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
            learned += 1
            tally.add(
                world,
                r,
                u,
                arm=sel.chosen,
                reward=reward,
                propensities=sel.propensities,
                explored=sel.explored,
            )
            if values is not None:
                values[r, u] = float(np.dot(sel.propensities, world.p[r, u]))
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


def simulate_values(
    config: SimulationConfig, policies: Sequence[str], scoring: ScoringConfig | None = None
) -> tuple[World, dict[str, PolicyResult], dict[str, FloatArray]]:
    """Like `simulate`, plus each policy's value at every decision, (rounds, users) (NaN
    before a user joins): sum_a pi(a|x) p(a|x), for per-segment reports (policy cards)."""
    scoring = scoring or ScoringConfig()
    built = _policies(list(dict.fromkeys(policies)), scoring)
    world = make_world(config)
    results: dict[str, PolicyResult] = {}
    values: dict[str, FloatArray] = {}
    for name, p in built.items():
        v = np.full((config.rounds, config.users), np.nan)
        results[name] = _run_policy(world, p, scoring.ridge_lambda, None, v)
        values[name] = v
    return world, results, values


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


# -- the offline gate: candidate vs incumbent over seeds --------------------------------


@dataclass(frozen=True, slots=True)
class OfflineGate:
    """Stage one of the promotion rule (ADR 0013): both policies run on the same world for
    each seed; the paired difference of their values decides."""

    config: SimulationConfig
    seeds: tuple[int, ...]
    candidate: tuple[PolicyResult, ...]
    incumbent: tuple[PolicyResult, ...]
    value: promotion.PairedDifference
    """candidate − incumbent in value (true expected reward per decision), one a seed."""
    regret: promotion.PairedDifference
    """candidate − incumbent in cumulative regret (negative is better), for the record."""
    decision: promotion.GateDecision


def offline_gate(
    config: SimulationConfig,
    candidate: str,
    incumbent: str,
    seeds: Sequence[int],
    scoring: ScoringConfig | None = None,
    *,
    margin: float = 0.0,
) -> OfflineGate:
    """Run `candidate` and `incumbent` on the world of every seed (common random numbers
    within a seed) and gate on the lower 95% bound of their paired difference in value."""
    if candidate == incumbent:
        raise ValueError("the candidate and the incumbent are the same policy")
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise ValueError(f"the offline gate needs at least 2 distinct seeds (got {list(seeds)})")
    cand: list[PolicyResult] = []
    inc: list[PolicyResult] = []
    for seed in seeds:
        sim = simulate(replace(config, seed=seed), [candidate, incumbent], scoring)
        cand.append(sim.result(candidate))
        inc.append(sim.result(incumbent))
    value = promotion.paired_difference(
        candidate,
        incumbent,
        [c.expected_reward - i.expected_reward for c, i in zip(cand, inc, strict=True)],
        metric="value",
    )
    regret = promotion.paired_difference(
        candidate,
        incumbent,
        [c.cumulative_regret - i.cumulative_regret for c, i in zip(cand, inc, strict=True)],
        metric="regret",
    )
    return OfflineGate(
        config=config,
        seeds=tuple(seeds),
        candidate=tuple(cand),
        incumbent=tuple(inc),
        value=value,
        regret=regret,
        decision=promotion.promote_paired(value, margin=margin),
    )

"""The offline simulator, the off-policy estimators and the promotion gate, including
`oo-ml gate` against a real in-process server."""

from __future__ import annotations

import asyncio
import math
import socket

import numpy as np
import pytest

from oo.scoring.v1 import scoring_pb2 as pb
from oo_ml import cli
from oo_ml.domain import ope as gate
from oo_ml.domain import promotion
from oo_ml.sim.runner import (
    SimulationResult,
    off_policy_estimate,
    replay,
    simulate,
    simulate_and_evaluate,
)
from oo_ml.sim.world import ARMS, SimulationConfig, make_world
from tests.conftest import ServerFactory

LEARNERS = ["egreedy", "egreedy-v2", "linucb", "lints"]
# 30 users x 100 rounds, users joining over the first 25 rounds: 2,650 decisions a policy,
# about 3 s for every policy plus two replays on 2 cores. Big enough that learning is
# visible and the estimators' standard errors are ~0.01-0.03; shared by the tests below.
WORLD = SimulationConfig(users=30, rounds=100, seed=3)


@pytest.fixture(scope="module")
def sim() -> SimulationResult:
    return simulate(WORLD, [*LEARNERS, "uniform"], log_policy="egreedy")


def _fingerprint(result: SimulationResult) -> list[object]:
    return [
        result.oracle,
        result.policies,
        [(d.decision_id, d.chosen, d.propensities, d.reward, d.true_p) for d in result.log],
    ]


def test_simulation_is_deterministic_for_a_seed() -> None:
    small = SimulationConfig(users=6, rounds=25, seed=11)
    first = simulate(small, ["egreedy", "lints"], log_policy="egreedy")
    again = simulate(small, ["egreedy", "lints"], log_policy="egreedy")
    assert _fingerprint(first) == _fingerprint(again)
    assert len(first.log) == first.result("egreedy").decisions > 0
    other = simulate(SimulationConfig(users=6, rounds=25, seed=12), ["egreedy", "lints"])
    assert other.policies != first.policies


def test_the_world_does_not_depend_on_which_policies_run() -> None:
    # Common random numbers: users, contexts and reward draws are fixed by the seed, so a
    # policy's run is the same whatever else is simulated beside it.
    small = SimulationConfig(users=6, rounds=25, seed=5)
    alone = simulate(small, ["uniform"])
    with_others = simulate(small, ["egreedy", "linucb", "uniform"])
    assert alone.oracle == with_others.oracle
    assert alone.result("uniform") == with_others.result("uniform")
    w1, w2 = make_world(small), make_world(small)
    assert np.array_equal(w1.p, w2.p) and np.array_equal(w1.draws, w2.draws)
    # The best arm changes with the context: a context-free policy cannot be optimal.
    assert len(set(w1.best.ravel().tolist())) == len(ARMS)


def test_the_oracle_has_zero_regret(sim: SimulationResult) -> None:
    oracle = sim.oracle
    assert oracle.cumulative_regret == 0.0
    assert oracle.best_arm_rate == 1.0
    assert all(oracle.expected_reward >= r.expected_reward for r in sim.policies)


@pytest.mark.parametrize("policy", LEARNERS)
def test_learning_policies_beat_uniform(sim: SimulationResult, policy: str) -> None:
    uniform, learner = sim.result("uniform"), sim.result(policy)
    # On this world uniform's value is ~0.32 and the oracle's ~0.52; the learners reach
    # 0.36-0.42 within 100 rounds. The drawn mean reward has a standard error of ~0.01 on
    # 2,650 decisions, so 0.01 is a margin the learners clear on every seed we tried;
    # value and regret are noise-free given the choices.
    assert learner.mean_reward > uniform.mean_reward + 0.01
    assert learner.expected_reward > uniform.expected_reward + 0.02
    assert learner.cumulative_regret < 0.9 * uniform.cumulative_regret
    assert learner.best_arm_rate > uniform.best_arm_rate


def _se(values: np.ndarray) -> float:
    return float(values.std() / math.sqrt(len(values)))


def test_replaying_uniform_sees_exactly_the_logged_contexts(sim: SimulationResult) -> None:
    # Uniform ignores its state, so its true value on egreedy's logged contexts is its
    # online value: the contexts are the same by construction (common random numbers).
    shadow = replay(sim.log, "uniform")
    assert shadow.value_on(sim.log) == pytest.approx(sim.result("uniform").expected_reward)
    assert np.allclose(shadow.propensities, 1 / len(ARMS))


def test_off_policy_estimates_track_the_true_online_value(sim: SimulationResult) -> None:
    log = sim.log
    rewards = np.array([d.reward for d in log])
    logged = np.array([d.chosen for d in log], dtype=np.intp)
    mu = np.array([d.propensities[d.chosen] for d in log])

    # uniform: IPS and DR are unbiased for its value on egreedy's log (egreedy gives every
    # arm at least eps/K = 0.025), and that value is its online value (test above). Allow
    # 3 standard errors of each estimator (99.7% of seeds): ~0.06 for DR, ~0.08 for IPS,
    # whose weights reach 0.25 / 0.025 = 10.
    target = replay(log, "uniform")
    est = off_policy_estimate(log, target)
    truth = sim.result("uniform").expected_reward
    dr_se = (est.dr_ci_high - est.dr_ci_low) / (2 * gate.Z95)
    ips_se = _se(gate.importance_weights(target.propensities, logged, mu) * rewards)
    assert abs(est.dr - truth) <= 3 * dr_se, (est, truth)
    assert abs(est.ips - truth) <= 3 * ips_se, (est, truth)

    # egreedy-v2, a learning policy: the replay trains it as the server's shadows are
    # trained, on egreedy's data, so its value on the log differs a little from its own
    # online run (~0.01-0.03 on the seeds we tried). Allow 3 DR standard errors (~0.04)
    # plus 0.02 for that difference.
    target = replay(log, "egreedy-v2")
    est = off_policy_estimate(log, target)
    dr_se = (est.dr_ci_high - est.dr_ci_low) / (2 * gate.Z95)
    assert abs(est.dr - target.value_on(log)) <= 3 * dr_se
    assert abs(est.dr - sim.result("egreedy-v2").expected_reward) <= 3 * dr_se + 0.02
    assert est.served_mean == pytest.approx(sim.result("egreedy").mean_reward)
    assert est.samples == len(log)


def test_snips_weights_normalise(sim: SimulationResult) -> None:
    log = sim.log
    target = replay(log, "uniform")
    logged = np.array([d.chosen for d in log], dtype=np.intp)
    mu = np.array([d.propensities[d.chosen] for d in log])
    rewards = np.array([d.reward for d in log])
    w = gate.importance_weights(target.propensities, logged, mu)
    normalised = gate.snips_weights(w)
    assert normalised.sum() == pytest.approx(1.0)
    est = off_policy_estimate(log, target)
    assert est.snips == pytest.approx(float(normalised @ rewards))
    # With a constant reward SNIPS is exact; IPS is off by the weights' mean (not 1).
    constant = gate.estimate(
        "uniform",
        target_propensities=target.propensities,
        estimates=target.estimates,
        logged_index=logged,
        logged_propensity=mu,
        rewards=np.full(len(log), 0.5),
    )
    assert constant.snips == pytest.approx(0.5)
    assert constant.ips == pytest.approx(0.5 * w.mean())
    assert not np.any(gate.snips_weights(np.zeros(3)))


def _estimate(samples: int, dr: float, half: float, served_mean: float) -> gate.OffPolicyEstimate:
    return gate.OffPolicyEstimate(
        "egreedy-v2", samples, dr, dr, dr, dr - half, dr + half, served_mean
    )


def test_gate_refuses_with_too_few_samples() -> None:
    d = promotion.promote(_estimate(120, 0.9, 0.01, 0.3), 0.3, min_samples=500, served="egreedy")
    assert not d.promote
    assert "120 samples, fewer than the 500 required" in d.reason


def test_gate_refuses_when_the_ci_lower_bound_is_not_above_served_plus_margin() -> None:
    d = promotion.promote(_estimate(2000, 0.42, 0.03, 0.40), 0.40, margin=0.0, served="egreedy")
    assert not d.promote
    assert "lower bound 0.3900 does not exceed egreedy mean 0.4000 + margin 0.0000" in d.reason
    # Clear of the served mean, but not of the margin.
    d = promotion.promote(_estimate(2000, 0.45, 0.01, 0.40), 0.40, margin=0.05, served="egreedy")
    assert (
        not d.promote
        and "0.4400 does not exceed egreedy mean 0.4000 + margin 0.0500 = 0.4500" in d.reason
    )
    nan = promotion.promote(_estimate(2000, math.nan, 0.01, 0.40), 0.40)
    assert not nan.promote and "not finite" in nan.reason


def test_gate_promotes_when_clearly_better() -> None:
    d = promotion.promote_from_stats(
        policy="egreedy-v2",
        samples=5000,
        ips=0.52,
        snips=0.51,
        dr=0.50,
        dr_ci_low=0.48,
        dr_ci_high=0.52,
        served_mean=0.40,
        min_samples=500,
        margin=0.02,
        served="egreedy",
    )
    assert d.promote
    assert d.reason.startswith(
        "promote egreedy-v2: DR CI lower bound 0.4800 exceeds egreedy mean 0.4000"
    )
    assert "5000 samples" in d.reason


def test_offline_gate_promotes_a_learner_over_uniform_logs() -> None:
    # On uniform's logs (every propensity 1/4) egreedy-v2 trained as a shadow is worth
    # ~0.36-0.37 against uniform's ~0.31: its DR lower bound cleared uniform's mean by
    # 0.04-0.06 on each of seeds 1-10 at this size (3,530 samples).
    report = simulate_and_evaluate(
        SimulationConfig(users=40, rounds=100, seed=4),
        ["uniform"],
        log_policy="uniform",
        evaluate=["egreedy-v2"],
        min_samples=1000,
    )
    (evaluation,) = report.evaluations
    assert evaluation.decision.promote, evaluation.decision.reason
    assert evaluation.decision.reason.startswith("promote egreedy-v2: DR CI lower bound")
    assert "uniform mean" in evaluation.decision.reason
    assert evaluation.estimate.samples == len(report.simulation.log) == 3530


def test_simulate_command_prints_results_and_the_gate(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "simulate",
        "--users",
        "4",
        "--rounds",
        "12",
        "--seed",
        "2",
        "--policies",
        "egreedy,uniform",
    ]
    assert cli.main([*argv, "--evaluate", "egreedy-v2", "--min-samples", "10000"]) == 0
    out = capsys.readouterr().out
    for word in ("oracle", "egreedy", "uniform", "IPS", "SNIPS", "DR 95% CI", "online value"):
        assert word in out
    assert "refuse egreedy-v2:" in out and "fewer than the 10000 required" in out
    assert cli.main([*argv, "--policies", "nope"]) == 2


async def test_gate_command_against_a_running_server(
    server_factory: ServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = await server_factory({"OO_SHADOW_POLICIES": "egreedy-v2"})
    for i in range(24):
        resp = await srv.stub.Score(
            pb.ScoreRequest(
                user_id=f"u{i % 3}",
                candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in ARMS],
                context=pb.Context(hour_of_day=i % 24),
            )
        )
        await srv.app.engine.drain()  # type: ignore[union-attr]
        chosen = next(c.arm for c in resp.ranking if c.tip_id == resp.chosen_tip_id)
        # Every fourth reward is 1 whatever the choice: if every reward could be 0 (all 24
        # choices missing, (3/4)^24 = 1 run in 1,000), the SNIPS interval would be 0 wide.
        reward = 1.0 if chosen == ARMS[(i % 24) // 6] or i % 4 == 0 else 0.0
        await srv.stub.Reward(pb.RewardRequest(decision_id=resp.decision_id, reward=reward))

    base = ["gate", "--address", srv.address, "--served", "egreedy"]

    async def run(*args: str) -> tuple[int, str]:
        code = await asyncio.to_thread(cli.main, [*base, *args])
        return code, capsys.readouterr().out

    code, out = await run("--candidate", "egreedy-v2", "--min-samples", "500")
    assert code == 1
    assert "egreedy-v2 behind egreedy: samples 24" in out
    # Stats.shadows carries SNIPS's delta-method CI (ADR 0015), equal to the offline maths.
    stats = await srv.stub.Stats(pb.StatsRequest(policy="egreedy"))
    (shadow,) = [s for s in stats.shadows if s.policy == "egreedy-v2"]
    assert shadow.snips_ci_low <= shadow.snips <= shadow.snips_ci_high
    assert shadow.snips_ci_high - shadow.snips_ci_low > 0
    assert "refuse egreedy-v2: 24 samples, fewer than the 500 required" in out

    # A margin of -1 makes any candidate with enough samples pass: the exit-0 path.
    code, out = await run("--candidate", "egreedy-v2", "--min-samples", "10", "--margin", "-1")
    assert code == 0 and "promote egreedy-v2: DR CI lower bound" in out

    code, out = await run("--candidate", "lints")
    assert code == 1 and "no off-policy samples" in out and "egreedy-v2" in out


def test_gate_command_without_a_server_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = cli.main(
        [
            "gate",
            "--address",
            f"127.0.0.1:{port}",
            "--served",
            "egreedy",
            "--candidate",
            "egreedy-v2",
            "--timeout",
            "2",
        ]
    )
    assert code == 2
    assert "Stats on" in capsys.readouterr().err


def test_simulate_says_what_it_ran(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--users", "20", "--rounds", "100", "--policies", "egreedy"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    row = next(line for line in out.splitlines() if line.startswith("egreedy "))
    decisions = int(row.split()[2])
    # Users join over the first quarter of the rounds, so fewer than 20 x 100 decisions.
    assert decisions < 20 * 100
    assert "20 users joining over the first 25% of 100 rounds" in header
    assert f"{decisions} decisions a policy" in header

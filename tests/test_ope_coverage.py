"""OPE you can trust: on repeated simulated logs from each logging policy, the 95% DR and
SNIPS intervals of the target policies contain the target's true value (`value_on`: the
world's reward probabilities under the target's propensities, which only a simulator
knows) at least 90% of the time.

Set-up: logs of 20 users x 60 rounds (1065 decisions), seeds 1..10, every target replayed
as a shadow (as the server's shadows are), OO_MIN_EXPLORATION at its default (0.05), which
is what gives the `linucb` logs support (ADR 0014). The coverage is pooled over the five
targets (50 intervals per logging policy and estimator); a single target's is allowed to
dip to 80% (10 draws of a 95% interval miss twice about 7% of the time). The loggers run in
parallel processes to keep this under ~15 s.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from oo_ml.domain import ope
from oo_ml.sim.runner import off_policy_estimate, replay, simulate
from oo_ml.sim.world import SimulationConfig

LOGGERS = ("egreedy", "linucb", "lints")
TARGETS = ("egreedy", "egreedy-v2", "linucb", "lints", "uniform")
SEEDS = range(1, 11)


def _coverage(logger: str) -> dict[str, tuple[int, int]]:
    """target -> (DR intervals covering the truth, SNIPS intervals covering it)."""
    hits = {t: [0, 0] for t in TARGETS}
    for seed in SEEDS:
        sim = simulate(SimulationConfig(users=20, rounds=60, seed=seed), [], log_policy=logger)
        for target in TARGETS:
            shadow = replay(sim.log, target)
            est = off_policy_estimate(sim.log, shadow)
            truth = shadow.value_on(sim.log)
            hits[target][0] += est.dr_ci_low <= truth <= est.dr_ci_high
            hits[target][1] += est.snips_ci_low <= truth <= est.snips_ci_high
    return {t: (h[0], h[1]) for t, h in hits.items()}


@pytest.fixture(scope="module")
def coverage() -> dict[str, dict[str, tuple[int, int]]]:
    # Spawned, not forked: by now this process runs grpc's and BLAS's threads, and a forked
    # child inherits their locks (a fork here hung the whole suite in a matmul).
    spawn = multiprocessing.get_context("spawn")
    workers = min(len(LOGGERS), os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
        return dict(zip(LOGGERS, pool.map(_coverage, LOGGERS), strict=True))


@pytest.mark.parametrize("logger", LOGGERS)
def test_dr_and_snips_intervals_cover_the_true_value(
    logger: str, coverage: dict[str, dict[str, tuple[int, int]]]
) -> None:
    by_target = coverage[logger]
    n = len(SEEDS)
    for k, estimator in enumerate(("DR", "SNIPS")):
        pooled = sum(h[k] for h in by_target.values()) / (n * len(TARGETS))
        rates = {t: h[k] / n for t, h in by_target.items()}
        assert pooled >= 0.90, f"{estimator} on {logger} logs covers {pooled:.0%}: {rates}"
        assert min(rates.values()) >= 0.80, f"{estimator} on {logger} logs: {rates}"


def test_snips_interval_is_the_delta_method() -> None:
    rnd = np.random.default_rng(5)
    n, k = 400, 4
    mu = rnd.dirichlet(np.ones(k), n)
    pi = rnd.dirichlet(np.ones(k), n)
    logged = np.array([rnd.choice(k, p=m) for m in mu], dtype=np.intp)
    rewards = (rnd.random(n) < 0.4).astype(np.float64)
    est = ope.estimate(
        "t",
        target_propensities=pi,
        estimates=np.full((n, k), 0.4),
        logged_index=logged,
        logged_propensity=mu[np.arange(n), logged],
        rewards=rewards,
    )
    w = pi[np.arange(n), logged] / mu[np.arange(n), logged]
    snips = float(w @ rewards / w.sum())
    # Influence terms of the ratio: w_i (r_i - SNIPS) / mean(w); se = sd / sqrt(n).
    psi = w * (rewards - snips) / w.mean()
    se = math.sqrt(float((psi**2).mean()) / n)
    assert est.snips == pytest.approx(snips)
    assert est.snips_ci_low == pytest.approx(snips - ope.Z95 * se)
    assert est.snips_ci_high == pytest.approx(snips + ope.Z95 * se)


def test_snips_interval_is_nan_without_the_squared_sums() -> None:
    est = ope.from_sums(
        "t", 10, weight_sum=10.0, weighted_reward_sum=4.0, dr_sum=4.0, dr_sq_sum=4.0, reward_sum=4.0
    )
    assert est.snips == pytest.approx(0.4)
    assert math.isnan(est.snips_ci_low) and math.isnan(est.snips_ci_high)


def test_server_totals_give_the_snips_interval_only_when_they_cover_every_sample() -> None:
    from oo_ml.domain.engine.reports import shadow_report
    from oo_ml.domain.ports import OffPolicyTotals

    w = np.array([0.5, 2.0, 1.0, 4.0])
    r = np.array([1.0, 0.0, 1.0, 1.0])
    full = OffPolicyTotals(
        "s", 4, float(w.sum()), float(w @ r), 2.0, 1.5, 3.0, 4,
        float(w @ w), float((w * w) @ r), float((w * w) @ (r * r)),
    )  # fmt: skip
    est = shadow_report(full)
    snips = float(w @ r / w.sum())
    se = math.sqrt(float(((w * (r - snips)) ** 2).sum())) / float(w.sum())
    assert est.snips_ci_low == pytest.approx(snips - ope.Z95 * se)
    assert est.snips_ci_high == pytest.approx(snips + ope.Z95 * se)
    # Totals from before the squared sums were kept (sq_n < n): no interval.
    from dataclasses import replace

    old = shadow_report(replace(full, sq_n=1))
    assert math.isnan(old.snips_ci_low) and old.snips == pytest.approx(snips)

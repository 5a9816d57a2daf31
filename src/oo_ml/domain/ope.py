"""Off-policy evaluation: IPS, SNIPS and doubly-robust estimates with a 95% CI.

The estimators, for a target policy pi evaluated on decisions logged by a policy mu.
Sample i has the logged arm a_i, its logging propensity mu_i = mu(a_i | x_i) and reward
r_i; the target gives each arm a propensity pi_i(a) and its model an estimate q_i(a):

    w_i  = pi_i(a_i) / mu_i                         (0 when mu_i = 0)
    IPS  = sum_i w_i r_i / n
    SNIPS = sum_i w_i r_i / sum_i w_i               (the weights normalised to sum to 1)
    DR_i = sum_a pi_i(a) q_i(a) + w_i (r_i - q_i(a_i))
    DR   = mean_i DR_i,  95% CI = DR +- 1.96 sqrt(var(DR_i) / n)   (var with 1/n)

SNIPS's 95% CI is the delta method's normal approximation of the ratio estimator: its
influence terms are w_i (r_i - SNIPS) / mean(w), so

    se(SNIPS) = sqrt(sum_i w_i^2 (r_i - SNIPS)^2) / sum_i w_i,   CI = SNIPS +- 1.96 se

computed from the running sums of w^2, w^2 r and w^2 r^2. (`from_sums` without them,
as the server's stored totals are today, gives a NaN interval.) `tests/test_ope_coverage.py`
checks both intervals cover the true value on repeated simulated logs.

These are the formulas the server uses for its shadows: the engine calls `sample_terms`
per rewarded sample and `from_sums` on the running sums for `Stats.shadows`; `estimate`
runs both over arrays (offline logs), so online and offline numbers are the same maths.

The promotion gate that decides on these numbers is `promotion`. Nothing here imports
generated protobuf code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# Two-sided 95% normal quantile, as in the server's Stats.
Z95 = 1.96

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class OffPolicyEstimate:
    """A target policy's off-policy value on a logging policy's samples (the fields of
    `StatsResponse.shadows`)."""

    policy: str
    samples: int
    ips: float
    snips: float
    dr: float
    dr_ci_low: float
    dr_ci_high: float
    served_mean: float
    """The logging (served) policy's own mean reward on the same samples."""
    snips_ci_low: float = math.nan
    snips_ci_high: float = math.nan
    """SNIPS's 95% CI (delta method); NaN when the squared-weight sums were not kept."""


def sample_terms(
    target_propensities: Sequence[float],
    estimates: Sequence[float],
    logged_index: int,
    logged_propensity: float,
    reward: float,
) -> tuple[float, float]:
    """One logged sample's importance weight and doubly-robust term."""
    weight = target_propensities[logged_index] / logged_propensity if logged_propensity > 0 else 0.0
    direct = sum(p * q for p, q in zip(target_propensities, estimates, strict=True))
    return weight, direct + weight * (reward - estimates[logged_index])


def from_sums(
    policy: str,
    n: int,
    *,
    weight_sum: float,
    weighted_reward_sum: float,
    dr_sum: float,
    dr_sq_sum: float,
    reward_sum: float,
    weight_sq_sum: float | None = None,
    weight_sq_reward_sum: float | None = None,
    weight_sq_reward_sq_sum: float | None = None,
) -> OffPolicyEstimate:
    """The estimates from running sums over the samples (what the server accumulates).
    SNIPS's CI needs the sums of w^2, w^2 r and w^2 r^2; without them it is NaN."""
    m = max(n, 1)
    dr = dr_sum / m
    var = max(dr_sq_sum / m - dr * dr, 0.0)
    half = Z95 * math.sqrt(var / m)
    snips = weighted_reward_sum / weight_sum if weight_sum > 0 else 0.0
    snips_low = snips_high = math.nan
    if (
        weight_sq_sum is not None
        and weight_sq_reward_sum is not None
        and weight_sq_reward_sq_sum is not None
        and weight_sum > 0
    ):
        # sum w^2 (r - S)^2 = sum w^2 r^2 - 2 S sum w^2 r + S^2 sum w^2
        spread = weight_sq_reward_sq_sum - 2 * snips * weight_sq_reward_sum
        spread += snips * snips * weight_sq_sum
        snips_half = Z95 * math.sqrt(max(spread, 0.0)) / weight_sum
        snips_low, snips_high = snips - snips_half, snips + snips_half
    return OffPolicyEstimate(
        policy=policy,
        samples=n,
        ips=weighted_reward_sum / m,
        snips=snips,
        dr=dr,
        dr_ci_low=dr - half,
        dr_ci_high=dr + half,
        served_mean=reward_sum / m,
        snips_ci_low=snips_low,
        snips_ci_high=snips_high,
    )


def importance_weights(
    target_propensities: FloatArray,
    logged_index: npt.NDArray[np.intp],
    logged_propensity: FloatArray,
) -> FloatArray:
    """w_i = pi_i(a_i) / mu_i for arrays of shape (n, K), (n,), (n,); 0 where mu_i = 0."""
    pi = target_propensities[np.arange(len(logged_index)), logged_index]
    safe = np.where(logged_propensity > 0, logged_propensity, 1.0)
    return np.where(logged_propensity > 0, pi / safe, 0.0)


def snips_weights(weights: FloatArray) -> FloatArray:
    """The importance weights normalised to sum to 1 (SNIPS = their dot product with r);
    all zeros when no sample has weight."""
    total = float(weights.sum())
    return weights / total if total > 0 else np.zeros_like(weights)


def estimate(
    policy: str,
    *,
    target_propensities: FloatArray,
    estimates: FloatArray,
    logged_index: npt.NDArray[np.intp],
    logged_propensity: FloatArray,
    rewards: FloatArray,
) -> OffPolicyEstimate:
    """IPS, SNIPS and DR (each of the last two with its 95% CI) of a target policy on n
    logged samples.

    `target_propensities` and `estimates` are (n, K): the target's propensity and its
    model's reward estimate for each of the K candidates of each sample.
    """
    n = len(rewards)
    shapes = {target_propensities.shape, estimates.shape}
    if len(shapes) != 1 or target_propensities.shape[0] != n:
        raise ValueError(f"shapes disagree: {sorted(shapes)} for {n} samples")
    if not (len(logged_index) == len(logged_propensity) == n):
        raise ValueError("logged_index, logged_propensity and rewards must have one entry a sample")
    rows = np.arange(n)
    w = importance_weights(target_propensities, logged_index, logged_propensity)
    direct = (target_propensities * estimates).sum(axis=1)
    dr = direct + w * (rewards - estimates[rows, logged_index])
    return from_sums(
        policy,
        n,
        weight_sum=float(w.sum()),
        weighted_reward_sum=float(w @ rewards),
        dr_sum=float(dr.sum()),
        dr_sq_sum=float(dr @ dr),
        reward_sum=float(rewards.sum()),
        weight_sq_sum=float(w @ w),
        weight_sq_reward_sum=float((w * w) @ rewards),
        weight_sq_reward_sq_sum=float((w * w) @ (rewards * rewards)),
    )

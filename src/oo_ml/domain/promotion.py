"""The promotion gate: promote a candidate policy only on evidence.

`promote`: promote a candidate only when it has at least `min_samples` samples and the
lower bound of its DR 95% CI exceeds the served policy's mean reward plus `margin` (a tie
refuses). Every decision carries a reason naming the numbers. Inputs are plain values: an
`OffPolicyEstimate` from `ope.estimate` (an offline log), or the fields of a server's
`StatsResponse.shadows` entry via `promote_from_stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from oo_ml.domain.ope import OffPolicyEstimate

DEFAULT_MIN_SAMPLES = 500


@dataclass(frozen=True, slots=True)
class GateDecision:
    promote: bool
    reason: str

    def __str__(self) -> str:
        return self.reason


def promote(
    candidate: OffPolicyEstimate,
    served_mean: float,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    margin: float = 0.0,
    served: str = "the served policy",
) -> GateDecision:
    """Promote only with at least `min_samples` samples and dr_ci_low > served_mean + margin."""
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1 (got {min_samples})")
    name = candidate.policy
    summary = (
        f"DR {candidate.dr:.4f} [95% CI {candidate.dr_ci_low:.4f}, {candidate.dr_ci_high:.4f}]"
        f" on {candidate.samples} samples; {served} mean {served_mean:.4f}, margin {margin:.4f}"
    )
    numbers = (candidate.dr, candidate.dr_ci_low, candidate.dr_ci_high, served_mean, margin)
    if not all(math.isfinite(v) for v in numbers):
        return GateDecision(False, f"refuse {name}: an estimate is not finite ({summary})")
    if candidate.samples < min_samples:
        return GateDecision(
            False,
            f"refuse {name}: {candidate.samples} samples, fewer than the {min_samples} required"
            f" ({summary})",
        )
    threshold = served_mean + margin
    if candidate.dr_ci_low <= threshold:
        return GateDecision(
            False,
            f"refuse {name}: DR CI lower bound {candidate.dr_ci_low:.4f} does not exceed"
            f" {served} mean {served_mean:.4f} + margin {margin:.4f} = {threshold:.4f} ({summary})",
        )
    return GateDecision(
        True,
        f"promote {name}: DR CI lower bound {candidate.dr_ci_low:.4f} exceeds {served} mean"
        f" {served_mean:.4f} + margin {margin:.4f} = {threshold:.4f} ({summary})",
    )


def promote_from_stats(
    *,
    policy: str,
    samples: int,
    ips: float,
    snips: float,
    dr: float,
    dr_ci_low: float,
    dr_ci_high: float,
    served_mean: float,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    margin: float = 0.0,
    served: str = "the served policy",
) -> GateDecision:
    """The gate on a running server's numbers: one `StatsResponse.shadows` entry."""
    candidate = OffPolicyEstimate(
        policy, samples, ips, snips, dr, dr_ci_low, dr_ci_high, served_mean
    )
    return promote(candidate, served_mean, min_samples=min_samples, margin=margin, served=served)

"""The promotion gate: promote a candidate policy only on evidence.

`promote`: promote a candidate only when it has at least `min_samples` samples and the
lower bound of its DR 95% CI exceeds the served policy's mean reward plus `margin` (a tie
refuses). Every decision carries a reason naming the numbers. Inputs are plain values: an
`OffPolicyEstimate` from `ope.estimate` (an offline log), or the fields of a server's
`StatsResponse.shadows` entry via `promote_from_stats`.

`promote_paired` is the offline stage (ADR 0013): the candidate against the incumbent on
the same simulated worlds over several seeds, promoted only when the lower 95% bound of
the paired difference in value exceeds the margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

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


# -- the offline gate: paired differences over simulated seeds ---------------------------


@dataclass(frozen=True, slots=True)
class PairedDifference:
    """candidate − incumbent on the same worlds (one value a seed), with a 95% t interval."""

    candidate: str
    incumbent: str
    metric: str
    differences: tuple[float, ...]
    mean: float
    ci_low: float
    ci_high: float


def paired_difference(
    candidate: str, incumbent: str, differences: Sequence[float], *, metric: str = "value"
) -> PairedDifference:
    """The mean of the paired differences and its two-sided 95% Student-t interval (n - 1
    degrees of freedom). With fewer than two differences the interval is infinite."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        low, high = -math.inf, math.inf
    else:
        half = float(student_t.ppf(0.975, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
        low, high = mean - half, mean + half
    return PairedDifference(candidate, incumbent, metric, tuple(d.tolist()), mean, low, high)


def promote_paired(diff: PairedDifference, *, margin: float = 0.0) -> GateDecision:
    """Stage one of the two-stage rule (ADR 0013): promote only when the lower 95% bound of
    candidate − incumbent over seeds exceeds `margin` (a tie refuses, NaN refuses)."""
    summary = (
        f"{diff.metric} {diff.candidate} − {diff.incumbent} = {diff.mean:+.4f}"
        f" [95% CI {diff.ci_low:+.4f}, {diff.ci_high:+.4f}] over {len(diff.differences)} seeds;"
        f" margin {margin:.4f}"
    )
    if len(diff.differences) < 2:
        return GateDecision(False, f"refuse {diff.candidate}: fewer than 2 seeds ({summary})")
    if not (math.isfinite(diff.ci_low) and math.isfinite(margin)):
        return GateDecision(False, f"refuse {diff.candidate}: a figure is not finite ({summary})")
    if diff.ci_low <= margin:
        return GateDecision(
            False,
            f"refuse {diff.candidate}: lower bound {diff.ci_low:+.4f} of its advantage over"
            f" {diff.incumbent} does not exceed {margin:.4f} ({summary})",
        )
    return GateDecision(
        True,
        f"promote {diff.candidate}: lower bound {diff.ci_low:+.4f} of its advantage over"
        f" {diff.incumbent} exceeds {margin:.4f} ({summary})",
    )

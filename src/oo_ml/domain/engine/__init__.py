"""The scoring engine, split by responsibility:

scoring   ScoringEngine: Score, Reward, Reset; assembles the parts below
types     commands and results (plain values the edge converts)
locks     per-user locks
models    per-user state as the policies see it, and the population priors
shadows   shadow policies: scored after the answer, evaluated off-policy
reports   Stats
upkeep    background jobs: sweeper, pruning, priors
"""

from oo_ml.domain.engine.scoring import ScoringEngine
from oo_ml.domain.engine.types import (
    FALLBACK_BUCKET,
    ArmReport,
    Candidate,
    DecisionListener,
    PromptReport,
    RewardResult,
    ScoreCommand,
    ScoreResult,
    StatsReport,
)

__all__ = [
    "FALLBACK_BUCKET",
    "ArmReport",
    "Candidate",
    "DecisionListener",
    "PromptReport",
    "RewardResult",
    "ScoreCommand",
    "ScoreResult",
    "ScoringEngine",
    "StatsReport",
]

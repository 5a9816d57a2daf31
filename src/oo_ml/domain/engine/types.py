"""The engine's commands and results: plain values the edge converts to and from proto."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple, Protocol

from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate
from oo_ml.domain.features import Assembled, Inputs
from oo_ml.domain.ope import OffPolicyEstimate

# The prompt-version bucket of curated fallback tips.
FALLBACK_BUCKET = "fallback"

_SCORE = attrgetter("score")


class Candidate(NamedTuple):
    # A NamedTuple, not a frozen dataclass: a Score builds one per candidate, and a frozen
    # dataclass's __init__ (one object.__setattr__ per field) costs about twice as much.
    tip_id: str
    arm: str
    generation_id: str = ""
    prompt_version: str = ""


@dataclass(frozen=True, slots=True)
class ScoreCommand:
    user_id: str
    candidates: tuple[Candidate, ...]
    inputs: Inputs
    policy: str = ""


@dataclass(frozen=True, slots=True)
class ScoreResult:
    record: DecisionRecord
    features: Assembled

    def ranking(self) -> list[LoggedCandidate]:
        """Candidates best first: the chosen one, then by score."""
        chosen = self.record.chosen
        rest = list(self.record.candidates)
        del rest[self.record.chosen_index]
        # Stable, like sorting on -score: equal scores keep the request's order.
        return [chosen, *sorted(rest, key=_SCORE, reverse=True)]


@dataclass(frozen=True, slots=True)
class RewardResult:
    applied: bool
    policy: str
    arm: str


@dataclass(frozen=True, slots=True)
class ArmReport:
    arm: str
    pulls: int
    rewarded: int
    reward_sum: float
    estimate: float

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rewarded if self.rewarded else 0.0


@dataclass(frozen=True, slots=True)
class PromptReport:
    prompt_version: str
    served: int
    rewarded: int
    reward_sum: float

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rewarded if self.rewarded else 0.0


@dataclass(frozen=True, slots=True)
class StatsReport:
    user_id: str
    policy: str
    feature_version: str
    decisions: int
    arms: list[ArmReport]
    prompts: list[PromptReport]
    shadows: list[OffPolicyEstimate]
    features: Assembled
    users: int
    pending: int

    @property
    def rewarded(self) -> int:
        return sum(a.rewarded for a in self.arms)

    @property
    def reward_sum(self) -> float:
        return sum(a.reward_sum for a in self.arms)

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rewarded if self.rewarded else 0.0


class DecisionListener(Protocol):
    """Told of every logged decision, after the commit. Must not block (ingest publishes)."""

    def decision_made(self, record: DecisionRecord) -> None: ...

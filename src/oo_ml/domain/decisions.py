"""The decision log's records: what a Score decided, with everything a Reward needs to join.

`Reward` names only a decision id; the server joins it to the logged x, arm and policy
here. Persisted form: `oo.state.v1.Decision` (see `state_codec`), with the reward kept in
store columns so it can be set exactly once by a conditional update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from oo_ml.domain.features import Vector


class LoggedCandidate(NamedTuple):
    # A NamedTuple for the reason Candidate is one: a Score builds one per candidate.
    tip_id: str
    arm: str
    score: float
    propensity: float
    generation_id: str = ""
    prompt_version: str = ""


@dataclass(frozen=True, slots=True)
class ShadowView:
    """A shadow policy's view of a served decision, for learning and off-policy value."""

    policy: str
    chosen_arm: str
    # The shadow's probability of the arm the served policy chose (IPS weight numerator).
    logged_arm_propensity: float
    # The shadow's propensity and its model's estimate, per logged candidate (for DR).
    propensities: tuple[float, ...]
    estimates: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    decision_id: str
    user_id: str
    policy: str
    feature_version: str
    x: Vector
    candidates: tuple[LoggedCandidate, ...]
    chosen_index: int
    explored: bool
    created_at: float  # unix seconds
    # Vectors under the shadows' feature versions, when they differ from `feature_version`.
    shadow_vectors: dict[str, Vector] = field(default_factory=dict)
    shadows: tuple[ShadowView, ...] = ()

    @property
    def chosen(self) -> LoggedCandidate:
        return self.candidates[self.chosen_index]


@dataclass(frozen=True, slots=True)
class RewardState:
    """The reward columns of a logged decision."""

    reward: float | None
    rewarded_at: float | None
    source: str  # "explicit" | "default" | "" (pending)


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    record: DecisionRecord
    reward: RewardState

    @property
    def pending(self) -> bool:
        return self.reward.reward is None

"""Table-driven tests of oo_ml.schema.validation against the generated messages.

Each case starts from a valid message, breaks one thing, and expects exactly the
violations (by field path) that one thing causes: no more, no fewer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from oo.events.v1 import envelope_pb2, signals_pb2
from oo.scoring.v1 import scoring_pb2
from oo_ml.errors import InvalidArgument
from oo_ml.schema.validation import validate, violations

NAN = math.nan


def score_request() -> scoring_pb2.ScoreRequest:
    """A request that breaks no rule, with every optional part filled in."""
    return scoring_pb2.ScoreRequest(
        user_id="user-1",
        candidates=[
            scoring_pb2.Candidate(tip_id="tip-a", arm="focus"),
            scoring_pb2.Candidate(tip_id="tip-b", arm="breaks"),
            scoring_pb2.Candidate(tip_id="tip-c"),
        ],
        context=scoring_pb2.Context(
            hour_of_day=9, day_of_week=2, timezone="Europe/Paris", open_tasks=4, overdue_tasks=1
        ),
        profile_features=scoring_pb2.ProfileFeatures(
            completion_rate_30d=0.4,
            dismiss_rate_30d=0.1,
            mean_dwell_ms_30d=5000,
            preferred_hour=8,
            tip_volume_30d=120,
        ),
        policy="linucb",
    )


def reward_request() -> scoring_pb2.RewardRequest:
    return scoring_pb2.RewardRequest(decision_id="dec-1", reward=1.0)


def envelope() -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(
        event_id="evt-1",
        schema_version="v1",
        producer="app",
        occurred_at=Timestamp(seconds=1_700_000_000),
        user_id="user-1",
        tip_feedback=signals_pb2.TipFeedback(
            decision_id="dec-1",
            tip_id="tip-a",
            action=signals_pb2.TIP_ACTION_COMPLETED,
            dwell_ms=1200,
        ),
    )


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], Message]
    breaks: Callable[[Message], object]
    fields: list[str]
    says: str = ""  # a fragment the (single) violation's description must contain


def _set_candidates(msg: scoring_pb2.ScoreRequest, tip_ids: list[str]) -> None:
    del msg.candidates[:]
    msg.candidates.extend(scoring_pb2.Candidate(tip_id=t) for t in tip_ids)


CASES = [
    Case("score-empty-user-id", score_request, lambda m: m.ClearField("user_id"), ["user_id"],
         "required"),
    Case("score-no-candidates", score_request, lambda m: _set_candidates(m, []), ["candidates"],
         "at least one"),
    Case("score-duplicate-tip-id", score_request,
         lambda m: _set_candidates(m, ["tip-a", "tip-a", "tip-b"]), ["candidates[1].tip_id"],
         "duplicate"),
    Case("score-duplicate-tip-id-later", score_request,
         lambda m: _set_candidates(m, ["tip-a", "tip-b", "tip-c", "tip-b"]),
         ["candidates[3].tip_id"], "duplicate"),
    Case("score-empty-tip-id", score_request, lambda m: _set_candidates(m, ["tip-a", ""]),
         ["candidates[1].tip_id"], "required"),
    Case("score-hour-of-day-25", score_request, lambda m: setattr(m.context, "hour_of_day", 25),
         ["context.hour_of_day"], "23"),
    Case("score-day-of-week-7", score_request, lambda m: setattr(m.context, "day_of_week", 7),
         ["context.day_of_week"], "6"),
    Case("score-bad-timezone", score_request,
         lambda m: setattr(m.context, "timezone", "Mars/Olympus_Mons"), ["context.timezone"],
         "timezone"),
    Case("score-profile-nan", score_request,
         lambda m: setattr(m.profile_features, "completion_rate_30d", NAN),
         ["profile_features.completion_rate_30d"], "finite"),
    Case("score-profile-inf", score_request,
         lambda m: setattr(m.profile_features, "mean_dwell_ms_30d", math.inf),
         ["profile_features.mean_dwell_ms_30d"], "finite"),
    Case("score-profile-above-range", score_request,
         lambda m: setattr(m.profile_features, "dismiss_rate_30d", 1.5),
         ["profile_features.dismiss_rate_30d"], "[0, 1]"),
    Case("score-profile-below-range", score_request,
         lambda m: setattr(m.profile_features, "completion_rate_30d", -0.1),
         ["profile_features.completion_rate_30d"], "[0, 1]"),
    Case("score-profile-uint-above-range", score_request,
         lambda m: setattr(m.profile_features, "preferred_hour", 24),
         ["profile_features.preferred_hour"], "[0, 23]"),
    # 5,000 identical tip_ids: one violation on the list, not one per item or duplicate.
    Case("score-5000-candidates", score_request, lambda m: _set_candidates(m, ["tip"] * 5000),
         ["candidates"], "at most 100 items (got 5000)"),
    Case("score-10000-char-user-id", score_request, lambda m: setattr(m, "user_id", "u" * 10_000),
         ["user_id"], "at most 256 characters"),
    Case("reward-nan", reward_request, lambda m: setattr(m, "reward", NAN), ["reward"], "finite"),
    Case("reward-out-of-range", reward_request, lambda m: setattr(m, "reward", 2.0), ["reward"],
         "<= 1"),
    Case("reward-no-decision-id", reward_request, lambda m: m.ClearField("decision_id"),
         ["decision_id"], "required"),
    Case("envelope-no-event-id", envelope, lambda m: m.ClearField("event_id"), ["event_id"],
         "required"),
    Case("envelope-no-occurred-at", envelope, lambda m: m.ClearField("occurred_at"),
         ["occurred_at"], "required"),
    Case("feedback-action-unspecified", envelope,
         lambda m: setattr(m.tip_feedback, "action", signals_pb2.TIP_ACTION_UNSPECIFIED),
         ["tip_feedback.action"], "required"),
    Case("feedback-action-unknown-number", envelope,
         lambda m: setattr(m.tip_feedback, "action", 7), ["tip_feedback.action"], "<= 3"),
    Case("feedback-dwell-over-24h", envelope,
         lambda m: setattr(m.tip_feedback, "dwell_ms", 86_400_001), ["tip_feedback.dwell_ms"],
         "<="),
]  # fmt: skip


@pytest.mark.parametrize("make", [score_request, reward_request, envelope])
def test_valid_messages_have_no_violations(make: Callable[[], Message]) -> None:
    msg = make()
    assert violations(msg) == []
    validate(msg)  # does not raise


def test_minimal_valid_score_request() -> None:
    req = scoring_pb2.ScoreRequest(user_id="u", candidates=[scoring_pb2.Candidate(tip_id="t")])
    assert violations(req) == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_violation(case: Case) -> None:
    msg = case.make()
    case.breaks(msg)
    found = violations(msg)
    assert [v.field for v in found] == case.fields, found
    if case.says:
        assert case.says in found[0].description, found[0]
    # Descriptions are bounded: a huge or hostile value is never echoed back whole.
    assert all(len(v.description) < 200 for v in found), found


def test_bare_tip_feedback_action_unspecified() -> None:
    fb = signals_pb2.TipFeedback(decision_id="dec-1")
    assert [v.field for v in violations(fb)] == ["action"]


def test_empty_envelope_names_every_required_field() -> None:
    found = [v.field for v in violations(envelope_pb2.Envelope())]
    assert found == ["event_id", "schema_version", "occurred_at", "user_id"]


def test_violations_are_collected_not_first_only() -> None:
    req = score_request()
    req.ClearField("user_id")
    req.context.hour_of_day = 25
    req.profile_features.completion_rate_30d = NAN
    fields = {v.field for v in violations(req)}
    assert fields == {"user_id", "context.hour_of_day", "profile_features.completion_rate_30d"}


def test_validate_raises_invalid_argument_with_violations() -> None:
    req = score_request()
    _set_candidates(req, ["tip-a", "tip-a"])
    req.context.hour_of_day = 25
    with pytest.raises(InvalidArgument) as exc:
        validate(req)
    assert [v.field for v in exc.value.violations] == [
        "candidates[1].tip_id",
        "context.hour_of_day",
    ]
    assert "candidates[1].tip_id" in str(exc.value)


def test_max_items_override_lowers_the_limit() -> None:
    req = score_request()  # 3 candidates
    limit = {"oo.scoring.v1.ScoreRequest.candidates": 2}
    assert [v.field for v in violations(req, max_items=limit)] == ["candidates"]
    assert violations(req, max_items={"oo.scoring.v1.ScoreRequest.candidates": 3}) == []

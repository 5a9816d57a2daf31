"""The compiled fast path and the detailed walker give one verdict on any message.

`validate` trusts the compiled predicate for valid requests and only walks for the paths of
a bad one, so the two must agree: a predicate that let through what the walker refuses
would let bad input in. Hypothesis drives both over values at and around every rule's
edges, for the request types and the event envelope.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from oo.events.v1 import envelope_pb2, signals_pb2
from oo.scoring.v1 import scoring_pb2 as pb
from oo_ml.schema.validation import is_valid, violations

TEXT_LENGTHS = st.sampled_from([0, 1, 63, 64, 65, 127, 128, 129, 255, 256, 257])
UINTS = st.sampled_from([0, 1, 6, 7, 9, 23, 24, 100_000, 100_001, 2**32 - 1])
FLOATS = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 1.5, -1.5, 0.2, 86_400_000.0, 86_400_001.0, 1e6, 1e7]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
)
ZONES = st.sampled_from(["", "UTC", "Europe/Paris", "Asia/Tokyo", "Not/AZone", "x" * 70])


def text(n: int, fill: str = "a") -> str:
    return fill * n


@st.composite
def contexts(draw: st.DrawFn) -> pb.Context:
    c = pb.Context(timezone=draw(ZONES))
    for name in ("hour_of_day", "day_of_week", "open_tasks", "overdue_tasks"):
        if draw(st.booleans()):
            setattr(c, name, draw(UINTS))
    return c


@st.composite
def profiles(draw: st.DrawFn) -> pb.ProfileFeatures:
    p = pb.ProfileFeatures()
    for name in ("completion_rate_30d", "dismiss_rate_30d", "mean_dwell_ms_30d", "tip_volume_30d"):
        if draw(st.booleans()):
            setattr(p, name, draw(FLOATS))
    if draw(st.booleans()):
        p.preferred_hour = draw(UINTS)
    return p


@st.composite
def score_requests(draw: st.DrawFn) -> pb.ScoreRequest:
    n = draw(st.sampled_from([0, 1, 2, 3, 100, 101]))
    ids = [text(draw(TEXT_LENGTHS), "t") or "" for _ in range(min(n, 3))]
    if n > 3:
        ids = [f"t{i}" for i in range(n)]
    if n >= 2 and draw(st.booleans()):
        ids[1] = ids[0]  # a duplicate tip_id
    candidates = [
        pb.Candidate(
            tip_id=i,
            arm=text(draw(TEXT_LENGTHS)),
            generation_id=text(draw(st.sampled_from([0, 128, 129]))),
            prompt_version=text(draw(st.sampled_from([0, 64, 65]))),
        )
        for i in ids
    ]
    req = pb.ScoreRequest(
        user_id=text(draw(TEXT_LENGTHS), "u"),
        candidates=candidates,
        policy=text(draw(st.sampled_from([0, 64, 65]))),
    )
    if draw(st.booleans()):
        req.context.CopyFrom(draw(contexts()))
    if draw(st.booleans()):
        req.profile_features.CopyFrom(draw(profiles()))
    return req


@st.composite
def envelopes(draw: st.DrawFn) -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope(
        event_id=text(draw(TEXT_LENGTHS), "e"),
        schema_version=draw(st.sampled_from(["", "v1", "1", "x" * 17])),
        user_id=text(draw(TEXT_LENGTHS), "u"),
    )
    if draw(st.booleans()):
        env.occurred_at.seconds = draw(st.integers(0, 2_000_000_000))
    kind = draw(st.sampled_from(["none", "feedback", "viewed", "tasks"]))
    if kind == "feedback":
        env.tip_feedback.CopyFrom(
            signals_pb2.TipFeedback(
                decision_id=text(draw(TEXT_LENGTHS), "d"),
                tip_id=text(draw(TEXT_LENGTHS), "t"),
                action=draw(st.sampled_from([0, 1, 2, 3])),  # type: ignore[arg-type]
                dwell_ms=draw(UINTS),
            )
        )
    elif kind == "viewed":
        env.tip_viewed.CopyFrom(signals_pb2.TipViewed(tip_id="t", dwell_ms=draw(UINTS)))
    elif kind == "tasks":
        env.task_synced.CopyFrom(
            signals_pb2.TaskSynced(
                provider=text(draw(TEXT_LENGTHS)),
                tasks=[signals_pb2.Task(id=text(draw(TEXT_LENGTHS)), title="x")],
            )
        )
    return env


def agree(msg: object, limits: dict[str, int] | None = None) -> None:
    found = violations(msg, max_items=limits)  # type: ignore[arg-type]
    assert is_valid(msg, limits) == (not found), found  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(score_requests())
def test_score_requests(req: pb.ScoreRequest) -> None:
    agree(req)
    agree(req, {pb.ScoreRequest.DESCRIPTOR.fields_by_name["candidates"].full_name: 2})


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0, 1, 128, 129]), FLOATS)
def test_reward_requests(n: int, reward: float) -> None:
    agree(pb.RewardRequest(decision_id=text(n, "d"), reward=reward))


@settings(max_examples=200, deadline=None)
@given(st.builds(pb.GenerateRequest, user_id=st.sampled_from(["", "u", "u" * 257])), contexts())
def test_generate_requests(req: pb.GenerateRequest, ctx: pb.Context) -> None:
    req.context.CopyFrom(ctx)
    agree(req)


@settings(max_examples=300, deadline=None)
@given(envelopes())
def test_envelopes(env: envelope_pb2.Envelope) -> None:
    agree(env)


def test_both_see_a_bad_and_a_good_request() -> None:
    # Guard the guard: a predicate that always agreed by saying "valid" would pass above
    # only if the walker also found nothing; here it must say no.
    bad = pb.ScoreRequest(user_id="u", candidates=[pb.Candidate(tip_id="")])
    assert not is_valid(bad) and violations(bad)
    good = pb.ScoreRequest(user_id="u", candidates=[pb.Candidate(tip_id="t")])
    assert is_valid(good) and not violations(good)

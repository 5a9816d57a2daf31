"""The decision codec's hand-written serialisation against protobuf's own.

`serialize_decision` writes a format-2 `Decision` itself (a Score serialises one on the
event loop every call); its bytes must be exactly `SerializeToString(deterministic=True)`
of the message the codec used to build, for any record, and read back as the record.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oo.state.v1 import state_pb2
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate
from oo_ml.stores import codec
from oo_ml.stores.codec import DecisionKey, decode_decision, encode_decision, serialize_decision

_F32 = np.dtype("<f4")
_NAMES = st.text(max_size=10) | st.sampled_from(["tip-1", "arm-1", "é😀", ""])
_DOUBLES = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def records(draw: st.DrawFn, valid: bool = False) -> DecisionRecord:
    """Any record; `valid`: one a Score makes (an arm is never empty, the chosen index is
    one of the candidates'), which is what reads back as it was written."""
    n = draw(st.integers(1 if valid else 0, 12))
    candidates = []
    for _ in range(n):
        tip = draw(_NAMES)
        arm = tip if draw(st.booleans()) else draw(_NAMES)
        if valid and not arm:
            arm = tip or "arm"
        candidates.append(
            LoggedCandidate(tip, arm, draw(_DOUBLES), draw(_DOUBLES), draw(_NAMES), draw(_NAMES))
        )
    dim = draw(st.integers(0, 13))
    return DecisionRecord(
        decision_id=draw(_NAMES),
        user_id=draw(_NAMES),
        policy=draw(_NAMES),
        feature_version=draw(st.sampled_from(["v1", "v2", "", "v9"])),
        x=np.array(draw(st.lists(_DOUBLES, min_size=dim, max_size=dim)), dtype=np.float64),
        candidates=tuple(candidates),
        chosen_index=draw(st.integers(0, n - 1 if valid else 2**32 - 1)),
        explored=draw(st.booleans()),
        created_at=draw(st.floats(0, 2e9)),
    )


def protobuf_serialisation(r: DecisionRecord) -> bytes:
    """The record through protobuf's message (the codec's code before it wrote bytes)."""
    msg = state_pb2.Decision(
        format_version=codec.DECISION_FORMAT,
        feature_version=r.feature_version,
        chosen_index=r.chosen_index,
        explored=r.explored,
        x32=np.asarray(r.x, dtype=_F32).tobytes(),
        scores32=np.array([c.score for c in r.candidates], dtype=_F32).tobytes(),
        propensities32=np.array([c.propensity for c in r.candidates], dtype=_F32).tobytes(),
    )
    for c in r.candidates:
        msg.candidates.add(
            tip_id=c.tip_id,
            arm="" if c.arm == c.tip_id else c.arm,
            generation_id=c.generation_id,
            prompt_version=c.prompt_version,
        )
    return msg.SerializeToString(deterministic=True)


@settings(max_examples=400, deadline=None)
@given(records())
def test_serialisation_is_protobufs_own_to_the_byte(r: DecisionRecord) -> None:
    with np.errstate(over="ignore"):  # float32 overflow is inf both ways
        assert serialize_decision(r) == protobuf_serialisation(r)
        # Again, from the candidates' remembered bytes.
        assert serialize_decision(r) == protobuf_serialisation(r)


@settings(max_examples=200, deadline=None)
@given(records(valid=True))
def test_a_decision_reads_back_as_it_was_written(r: DecisionRecord) -> None:
    with np.errstate(over="ignore"):
        back = decode_decision(
            encode_decision(r), DecisionKey(r.decision_id, r.user_id, r.policy, r.created_at)
        )
    f32 = lambda v: np.asarray(v, dtype=np.float64).astype(_F32)  # noqa: E731
    assert (back.chosen_index, back.explored, back.feature_version) == (
        r.chosen_index,
        r.explored,
        r.feature_version,
    )
    assert [(c.tip_id, c.arm, c.generation_id, c.prompt_version) for c in back.candidates] == [
        (c.tip_id, c.arm, c.generation_id, c.prompt_version) for c in r.candidates
    ]
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(f32(back.x), f32(r.x))
        np.testing.assert_array_equal(
            f32([c.score for c in back.candidates]), f32([c.score for c in r.candidates])
        )


@pytest.mark.parametrize("index", [-1, 2**32])
def test_a_chosen_index_out_of_uint32_range_is_refused_as_protobuf_refuses_it(index: int) -> None:
    r = DecisionRecord("d", "u", "p", "v2", np.zeros(2), (), index, False, 0.0)
    with pytest.raises(ValueError):
        protobuf_serialisation(r)
    with pytest.raises(ValueError):
        serialize_decision(r)


def test_the_remembered_candidate_bytes_are_bounded() -> None:
    codec._CANDIDATE_BYTES.clear()
    for i in range(codec._CANDIDATE_BYTES_MAX + 10):
        codec._candidate_entry(LoggedCandidate(f"t{i}", f"t{i}", 0.0, 0.0))
    assert len(codec._CANDIDATE_BYTES) <= codec._CANDIDATE_BYTES_MAX


def test_the_hand_written_serialisation_knows_every_field_of_both_messages() -> None:
    """`serialize_decision` writes Decision and LoggedCandidate by hand: a field added to
    either message must be added there (and to `protobuf_serialisation` above) first."""
    decision = {(f.name, f.number) for f in state_pb2.Decision.DESCRIPTOR.fields}
    candidate = {(f.name, f.number) for f in state_pb2.LoggedCandidate.DESCRIPTOR.fields}
    assert decision == {
        ("format_version", 1),
        ("decision_id", 2),
        ("user_id", 3),
        ("policy", 4),
        ("feature_version", 5),
        ("x", 6),
        ("candidates", 7),
        ("chosen_index", 8),
        ("explored", 9),
        ("created_at_ms", 10),
        ("shadow_vectors", 11),
        ("shadows", 12),
        ("x32", 13),
        ("scores32", 14),
        ("propensities32", 15),
    }
    assert candidate == {
        ("tip_id", 1),
        ("arm", 2),
        ("score", 3),
        ("propensity", 4),
        ("generation_id", 5),
        ("prompt_version", 6),
    }

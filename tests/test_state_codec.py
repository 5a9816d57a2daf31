"""The learned state's codec: its packed-bytes fast path against protobuf's own encoding.

`encode_state` writes the arrays as packed runs itself, and `decode_state` reads them
through a `bytes` mirror of the message; both must agree with protobuf exactly: the same
bytes as `SerializeToString(deterministic=True)`, and the same state from any valid
encoding, including ones the fast path cannot take (unpacked or split arrays).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oo.state.v1 import state_pb2
from oo_ml.domain.state import ArmModel, PolicyState, empty_state
from oo_ml.errors import UnreadableRecord
from oo_ml.schema.wire import varint
from oo_ml.stores.codec import _decode_state_fields, _readable, decode_state, encode_state

_DOUBLES = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def states(draw: st.DrawFn) -> PolicyState:
    dim = draw(st.integers(1, 13))
    names = draw(st.lists(st.text(max_size=12), max_size=5, unique=True))

    def vector(n: int) -> np.ndarray:
        return np.array(draw(st.lists(_DOUBLES, min_size=n, max_size=n)), dtype=np.float64)

    arms = {}
    for name in names:
        with_prior = draw(st.booleans())
        arms[name] = ArmModel(
            a_inv=vector(dim * dim).reshape(dim, dim),
            b=vector(dim),
            pulls=draw(st.integers(0, 2**64 - 1)),
            rewarded=draw(st.integers(0, 2**64 - 1)),
            reward_sum=draw(_DOUBLES),
            prior_precision=vector(dim) if with_prior else None,
            prior_theta=vector(dim) if with_prior else None,
        )
    return PolicyState(
        policy=draw(st.text(max_size=12)),
        feature_version=draw(st.sampled_from(["v1", "v2", ""])),
        dim=dim,
        ridge_lambda=draw(_DOUBLES),
        decisions=draw(st.integers(0, 2**64 - 1)),
        rewards=draw(st.integers(0, 2**64 - 1)),
        arms=arms,
    )


def protobuf_encoding(s: PolicyState) -> bytes:
    """The state through protobuf's repeated fields (the codec's encoding before it wrote
    packed runs itself)."""
    msg = state_pb2.PolicyState(
        format_version=1,
        policy=s.policy,
        feature_version=s.feature_version,
        dim=s.dim,
        ridge_lambda=s.ridge_lambda,
        decisions=s.decisions,
        rewards=s.rewards,
    )
    for name in sorted(s.arms):
        m = s.arms[name]
        msg.arms.add(
            arm=name,
            a_inv=m.a_inv.ravel().tolist(),
            b=m.b.tolist(),
            pulls=m.pulls,
            rewarded=m.rewarded,
            reward_sum=m.reward_sum,
            prior_precision=[] if m.prior_precision is None else m.prior_precision.tolist(),
            prior_theta=[] if m.prior_theta is None else m.prior_theta.tolist(),
        )
    return msg.SerializeToString(deterministic=True)


def _bits(a: np.ndarray | None) -> bytes | None:
    return None if a is None else np.asarray(a, dtype="<f8").tobytes()


def assert_same(a: PolicyState, b: PolicyState) -> None:
    """Equal to the bit (NaN payloads and -0.0 included)."""
    scalars = ("policy", "feature_version", "dim", "decisions", "rewards")
    assert [getattr(a, f) for f in scalars] == [getattr(b, f) for f in scalars]
    assert struct.pack("<d", a.ridge_lambda) == struct.pack("<d", b.ridge_lambda)
    assert list(a.arms) == list(b.arms)
    for name, x in a.arms.items():
        y = b.arms[name]
        assert (x.pulls, x.rewarded) == (y.pulls, y.rewarded)
        assert struct.pack("<d", x.reward_sum) == struct.pack("<d", y.reward_sum)
        assert x.a_inv.shape == y.a_inv.shape
        for f in ("a_inv", "b", "prior_precision", "prior_theta"):
            assert _bits(getattr(x, f)) == _bits(getattr(y, f)), f


@settings(max_examples=300, deadline=None)
@given(states())
def test_encoding_is_protobufs_own_to_the_byte(s: PolicyState) -> None:
    assert encode_state(s) == protobuf_encoding(s)


@settings(max_examples=300, deadline=None)
@given(states())
def test_a_state_reads_back_as_it_was_written(s: PolicyState) -> None:
    data = encode_state(s)
    back = decode_state(data)
    # The names come back in the stored (sorted) order.
    assert_same(back, s.__class__(**{**_fields(s), "arms": dict(sorted(s.arms.items()))}))
    assert_same(back, _decode_state_fields(data))


def _fields(s: PolicyState) -> dict[str, object]:
    return {
        f: getattr(s, f)
        for f in ("policy", "feature_version", "dim", "ridge_lambda", "decisions", "rewards")
    }


def _unpacked(number: int, values: np.ndarray) -> bytes:
    """A repeated double written element by element (wire type 1), as proto2 encoders do:
    every parser must accept it for a packed field."""
    tag = varint(number << 3 | 1)
    return b"".join(tag + struct.pack("<d", v) for v in values.ravel())


def _split(number: int, values: np.ndarray) -> bytes:
    """A packed repeated double written as two runs, which parsers concatenate."""
    flat = values.ravel()
    half = len(flat) // 2
    tag = varint(number << 3 | 2)
    return b"".join(
        tag + varint(8 * len(part)) + part.astype("<f8").tobytes()
        for part in (flat[:half], flat[half:])
    )


def _packed(number: int, values: np.ndarray) -> bytes:
    raw = values.ravel().astype("<f8").tobytes()
    return varint(number << 3 | 2) + varint(len(raw)) + raw


@pytest.mark.parametrize(
    ("write", "write_prior"),
    [(_unpacked, _unpacked), (_split, _split), (_packed, _unpacked), (_packed, _split)],
    ids=["unpacked", "split", "unpacked-prior", "split-prior"],
)
def test_arrays_the_fast_path_cannot_take_are_read_the_slow_way(write, write_prior) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    s = empty_state("linucb", "v2", 12, 1.0).with_arms(["focus", "plan"])
    s = s.learned("focus", rng.random(12), 1.0)
    prior = ArmModel.fresh(12, 1.0, rng.random(12), rng.random(12))
    s = s.__class__(**{**_fields(s), "arms": {**s.arms, "plan": prior}})
    head = state_pb2.PolicyState(
        format_version=1, policy=s.policy, feature_version="v2", dim=12, ridge_lambda=1.0
    ).SerializeToString()
    arms = b""
    for name in sorted(s.arms):
        m = s.arms[name]
        body = state_pb2.ArmState(arm=name, reward_sum=m.reward_sum).SerializeToString()
        body += write(2, m.a_inv) + write(3, m.b)
        if m.prior_precision is not None and m.prior_theta is not None:
            body += write_prior(7, m.prior_precision) + write_prior(8, m.prior_theta)
        arms += b"\x42" + varint(len(body)) + body
    data = head + arms
    assert data != encode_state(s)  # another encoding of the same state
    assert_same(decode_state(data), _decode_state_fields(data))
    back = decode_state(data)
    assert np.array_equal(back.arms["plan"].prior_theta, s.arms["plan"].prior_theta)  # type: ignore[arg-type]
    assert np.array_equal(back.arms["focus"].a_inv, s.arms["focus"].a_inv)


def test_a_decoded_state_is_a_value_that_updates_into_a_new_one() -> None:
    s = empty_state("linucb", "v2", 12, 1.0).with_arms(["focus"])
    back = decode_state(encode_state(s))
    with pytest.raises(ValueError):  # its arrays are views of the record, read-only
        back.arms["focus"].a_inv[0, 0] = 2.0
    learned = back.learned("focus", np.ones(12), 1.0)
    assert learned.arms["focus"].rewarded == 1
    assert_same(back, decode_state(encode_state(s)))  # the decoded one is unchanged


@pytest.mark.parametrize(
    "data",
    [
        b"\x42\x05\x12\x03abc",  # an a_inv run cut short inside its arm
        b"\x20\x0c\x42\x0b\x12\x09" + b"\x00" * 9,  # dim 12, a_inv of one double and a byte
    ],
)
def test_a_damaged_state_is_unreadable_not_misread(data: bytes) -> None:
    with pytest.raises(UnreadableRecord):
        decode_state(data)


def _run(number: int, values: list[float]) -> bytes:
    raw = np.array(values, dtype="<f8").tobytes()
    return varint(number << 3 | 2) + varint(len(raw)) + raw


@pytest.mark.parametrize(
    "arm",
    [
        _run(2, [9.0]) + _run(2, [1, 2, 3, 4]) + _run(3, [5, 6]),  # a_inv: 5 doubles in all
        _run(2, [1, 2, 3, 4]) + _run(2, [1, 2, 3, 4]) + _run(3, [5, 6]),  # a_inv twice
        _run(2, [1, 2, 3, 4]) + _run(3, [9.0]) + _run(3, [5, 6]),  # b: [9, 5, 6]
        _run(2, [1, 2, 3, 4]) + _run(3, [9.0]),  # b of one double, in one run
        _run(2, [1, 2, 3, 4]) + _run(3, [5, 6]) + _run(7, [5, 6]) + _run(7, [5, 6]),
        _run(2, [1, 2, 3, 4]) + _run(3, [5, 6]) + b"\x20\x01\x20\x02",  # pulls twice
    ],
    ids=["short-then-full", "a_inv-twice", "b-split", "b-short", "prior-twice", "pulls-twice"],
)
def test_odd_arrays_read_as_protobuf_reads_them(arm: bytes) -> None:
    """Protobuf joins an array's runs (the mirror would keep the last one), and reads an
    array of another length as it is."""
    head = state_pb2.PolicyState(
        format_version=1, policy="p", feature_version="v", dim=2, ridge_lambda=1.0
    ).SerializeToString()
    data = head + b"\x42" + varint(len(arm) + 3) + b"\x0a\x01x" + arm
    try:
        expected = _readable("PolicyState", _decode_state_fields, data)
    except UnreadableRecord:
        with pytest.raises(UnreadableRecord):
            decode_state(data)
    else:
        assert_same(decode_state(data), expected)


def test_arrays_of_another_dtype_or_layout_encode_as_their_float64_values() -> None:
    a = np.arange(16, dtype=np.float32).reshape(4, 4).T  # Fortran order, float32
    arm = ArmModel(a_inv=a, b=np.arange(4, dtype=np.int64), prior_precision=np.ones(4)[::1])
    s = PolicyState("p", "v2", 4, 1.0, arms={"x": arm, "": arm})
    assert encode_state(s) == protobuf_encoding(s)


def test_a_dimensionless_state_reads_the_same_both_ways() -> None:
    s = PolicyState("p", "v0", 0, 1.0, arms={"x": ArmModel(a_inv=np.zeros((0, 0)), b=np.zeros(0))})
    data = encode_state(s)
    assert data == protobuf_encoding(s)
    assert_same(decode_state(data), _decode_state_fields(data))


@pytest.mark.parametrize("count", [-1, 2**64])
def test_a_count_out_of_uint64_range_is_refused_as_protobuf_refuses_it(count: int) -> None:
    arm = ArmModel(a_inv=np.eye(2), b=np.zeros(2), pulls=count)
    s = PolicyState("p", "v", 2, 1.0, arms={"x": arm})
    with pytest.raises(ValueError):
        protobuf_encoding(s)
    with pytest.raises(ValueError):
        encode_state(s)


def test_the_hand_written_encoding_knows_every_field_of_both_messages() -> None:
    """`encode_state` writes ArmState by hand and PolicyState's arms last: a field added to
    either message must be added there (and to `protobuf_encoding` above) first."""
    arm = {(f.name, f.number) for f in state_pb2.ArmState.DESCRIPTOR.fields}
    state = {(f.name, f.number) for f in state_pb2.PolicyState.DESCRIPTOR.fields}
    assert arm == {
        ("arm", 1),
        ("a_inv", 2),
        ("b", 3),
        ("pulls", 4),
        ("rewarded", 5),
        ("reward_sum", 6),
        ("prior_precision", 7),
        ("prior_theta", 8),
    }
    assert state == {
        ("format_version", 1),
        ("policy", 2),
        ("feature_version", 3),
        ("dim", 4),
        ("ridge_lambda", 5),
        ("decisions", 6),
        ("rewards", 7),
        ("arms", 8),
    }

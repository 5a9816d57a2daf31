"""Conversion of learned state and decisions to and from their versioned proto forms.

This is the only module that knows `oo.state.v1`; stores persist the bytes it makes, and
the domain never sees a proto. A reader refuses a `format_version` newer than it knows
rather than guess at it.
"""

from __future__ import annotations

import operator
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields
from google.protobuf.message import DecodeError, Message

from oo.state.v1 import state_pb2
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate, ShadowView
from oo_ml.domain.features import Vector
from oo_ml.domain.state import FORMAT_VERSION, ArmModel, PolicyState
from oo_ml.errors import UnreadableRecord, UnsupportedFormat
from oo_ml.schema.wire import delimited, tag, varint

T = TypeVar("T")


def _readable(what: str, decode: Callable[[bytes], T], data: bytes) -> T:
    """decode(data), with any failure to read it raised as UnreadableRecord."""
    try:
        return decode(data)
    except UnreadableRecord:
        raise
    except (DecodeError, ValueError, IndexError, TypeError) as e:
        raise UnreadableRecord(f"{what} does not decode: {type(e).__name__}: {e}") from None


def _check(version: int, what: str, newest: int = FORMAT_VERSION) -> None:
    if version > newest:
        raise UnsupportedFormat(f"{what} format_version {version} is newer than {newest}")


# -- learned state ------------------------------------------------------------------------
#
# A user's state is mostly arrays: ten arms of a 12 x 12 A^-1 are 1,440 doubles. Through
# protobuf's repeated fields every element becomes a Python float on the way in and out,
# which cost about 54 us to encode such a state and 66 us to decode it here, on the thread
# that commits each Reward and on every cache miss. A packed repeated double is, on the
# wire, one length-delimited run of little-endian float64s. So the arrays are written as
# those bytes directly, in field order, giving exactly the bytes of
# `SerializeToString(deterministic=True)` (tests compare them); and they are read by
# parsing the record with a mirror of the two messages whose packed fields are `bytes`
# (same numbers, same wire type), then `np.frombuffer`. A record whose arrays are not
# one packed run each (another encoder's unpacked or split fields) is read the slow way.
# A field added to either message must be added here too: a test pins their fields.

_F64 = np.dtype("<f8")
# ArmState's fields by number and wire type (0 varint, 1 fixed64, 2 length-delimited).
_ARM_NAME, _A_INV, _B = tag(1, 2), tag(2, 2), tag(3, 2)
_PULLS, _REWARDED, _REWARD_SUM = tag(4, 0), tag(5, 0), tag(6, 1)
_PRIOR_PRECISION, _PRIOR_THETA = tag(7, 2), tag(8, 2)
_ARMS = tag(8, 2)  # PolicyState.arms
_DOUBLE = struct.Struct("<d")
_ZERO_DOUBLE = _DOUBLE.pack(0.0)
_UINT64 = 1 << 64


def _packed(key: bytes, values: Vector | None) -> bytes:
    if values is None or values.size == 0:
        return b""  # proto3 writes no empty repeated field
    raw = np.ascontiguousarray(values, dtype=_F64).tobytes()
    return delimited(key, raw)


def _arm_bytes(name: str, m: ArmModel) -> bytes:
    if not (0 <= m.pulls < _UINT64 and 0 <= m.rewarded < _UINT64):
        raise ValueError(f"arm {name!r}: pulls and rewarded must fit a uint64")
    parts = []
    if name:
        text = name.encode()
        parts.append(delimited(_ARM_NAME, text))
    parts.append(_packed(_A_INV, m.a_inv))
    parts.append(_packed(_B, m.b))
    if m.pulls:
        parts.append(_PULLS + varint(m.pulls))
    if m.rewarded:
        parts.append(_REWARDED + varint(m.rewarded))
    reward_sum = _DOUBLE.pack(m.reward_sum)
    if reward_sum != _ZERO_DOUBLE:  # proto3 skips a double whose bits are all 0 (not -0.0)
        parts.append(_REWARD_SUM + reward_sum)
    parts.append(_packed(_PRIOR_PRECISION, m.prior_precision))
    parts.append(_packed(_PRIOR_THETA, m.prior_theta))
    return b"".join(parts)


def encode_state(s: PolicyState) -> bytes:
    head = state_pb2.PolicyState(
        format_version=FORMAT_VERSION,
        policy=s.policy,
        feature_version=s.feature_version,
        dim=s.dim,
        ridge_lambda=s.ridge_lambda,
        decisions=s.decisions,
        rewards=s.rewards,
    ).SerializeToString(deterministic=True)
    parts = [head]
    for name in sorted(s.arms):
        arm = _arm_bytes(name, s.arms[name])
        parts.append(delimited(_ARMS, arm))
    return b"".join(parts)


def _packed_view(name: str) -> type[Message]:
    """A mirror of ArmState and PolicyState with ArmState's packed doubles as `bytes`."""
    package = "oo_ml.codec.packed"
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{package.replace('.', '/')}.proto", package=package, syntax="proto3"
    )
    arm = file.message_type.add()
    state_pb2.ArmState.DESCRIPTOR.CopyToProto(arm)
    for f in arm.field:
        if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE and (
            f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
        ):
            f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            f.label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            f.ClearField("options")
    state = file.message_type.add()
    state_pb2.PolicyState.DESCRIPTOR.CopyToProto(state)
    for f in state.field:
        if f.name == "arms":
            f.type_name = f".{package}.ArmState"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))


_PackedPolicyState = _packed_view("PolicyState")


def decode_state(data: bytes) -> PolicyState:
    return _readable("PolicyState", _decode_state, data)


def _floats64(raw: bytes, count: int) -> Vector | None:
    """`count` doubles from one packed run, None when the run holds another count. The
    array is a read-only view of the record's bytes: states are values, never changed in
    place (an update makes new arrays), and a copy of each would cost a third of the decode."""
    if len(raw) != 8 * count:
        return None
    return np.frombuffer(raw, dtype=_F64)


def _decode_state(data: bytes) -> PolicyState:
    # The mirror is built at run time: mypy knows it only as a Message.
    msg: Any = _PackedPolicyState.FromString(data)
    _check(msg.format_version, "PolicyState")
    if msg.ByteSize() != len(data):
        # A field given more than once: protobuf joins an array's runs, the mirror keeps
        # the last one. (Unknown fields count in ByteSize, so they do not trip this.)
        return _decode_state_fields(data)
    d = msg.dim
    arms = {}
    for a in msg.arms:
        a_inv, b = _floats64(a.a_inv, d * d), _floats64(a.b, d)
        precision, theta = a.prior_precision, a.prior_theta
        if (
            a_inv is None
            or b is None
            or len(precision) not in (0, 8 * d)
            or len(theta) not in (0, 8 * d)
            or len(unknown_fields.UnknownFieldSet(a))
        ):
            return _decode_state_fields(data)  # an array not in one packed run
        arms[a.arm] = ArmModel(
            a_inv=a_inv.reshape(d, d),
            b=b,
            pulls=a.pulls,
            rewarded=a.rewarded,
            reward_sum=a.reward_sum,
            prior_precision=_floats64(precision, d),
            prior_theta=_floats64(theta, d),
        )
    return _state(msg, arms)


def _state(msg: Any, arms: dict[str, ArmModel]) -> PolicyState:
    """A decoded PolicyState (or its mirror) with its arms."""
    return PolicyState(
        policy=msg.policy,
        feature_version=msg.feature_version,
        dim=msg.dim,
        ridge_lambda=msg.ridge_lambda,
        decisions=msg.decisions,
        rewards=msg.rewards,
        arms=arms,
    )


def _decode_state_fields(data: bytes) -> PolicyState:
    """The state through protobuf's repeated fields: any valid encoding of it."""
    msg = state_pb2.PolicyState.FromString(data)
    _check(msg.format_version, "PolicyState")
    d = msg.dim
    arms = {
        a.arm: ArmModel(
            a_inv=np.array(a.a_inv, dtype=np.float64).reshape(d, d),
            b=np.array(a.b, dtype=np.float64),
            pulls=a.pulls,
            rewarded=a.rewarded,
            reward_sum=a.reward_sum,
            prior_precision=np.array(a.prior_precision, dtype=np.float64)
            if len(a.prior_precision) == d
            else None,
            prior_theta=np.array(a.prior_theta, dtype=np.float64)
            if len(a.prior_theta) == d
            else None,
        )
        for a in msg.arms
    }
    return _state(msg, arms)


# Decisions are written in format 2 (float32 arrays, no fields the store's columns hold);
# format 1 records (float64, every field in the blob) are still read.
DECISION_FORMAT = 2
COMPRESS_LEVEL = 1
_F32 = np.dtype("<f4")


@dataclass(frozen=True, slots=True)
class DecisionKey:
    """What the store keeps in columns beside a format-2 record."""

    decision_id: str
    user_id: str
    policy: str
    created_at: float


def encode_decision(r: DecisionRecord) -> bytes:
    """A decision as the log stores it: about 0.2 KB with ten candidates. Shadows' views
    are stored apart (`encode_shadow_views`), never in the record."""
    return compress_decision(serialize_decision(r))


# Decision's fields (format 2) and LoggedCandidate's, by number and wire type. A decision
# is serialised on the event loop for every Score; building the message (ten candidates
# added one by one) cost about 11 us, so its bytes are written here directly, in field
# order, exactly as `SerializeToString(deterministic=True)` writes them (a test compares
# them). A candidate's bytes repeat from Score to Score (the same tips, arms and prompt
# versions), so they are made once. A field added to either message must be added here
# too: a test pins their fields.
_D_FORMAT, _D_FEATURE_VERSION, _D_CANDIDATES = tag(1, 0), tag(5, 2), tag(7, 2)
_D_CHOSEN, _D_EXPLORED = tag(8, 0), tag(9, 0)
_D_X32, _D_SCORES32, _D_PROPENSITIES32 = tag(13, 2), tag(14, 2), tag(15, 2)
_C_TIP, _C_ARM, _C_GENERATION, _C_PROMPT = tag(1, 2), tag(2, 2), tag(5, 2), tag(6, 2)
_D_HEAD = _D_FORMAT + varint(DECISION_FORMAT)
_UINT32 = 1 << 32
_CANDIDATE_BYTES: dict[tuple[str, str, str, str], bytes] = {}
_SCORE: Callable[[LoggedCandidate], float] = operator.itemgetter(2)
_PROPENSITY: Callable[[LoggedCandidate], float] = operator.itemgetter(3)
_CANDIDATE_BYTES_MAX = 20_000


def _run(key: bytes, raw: bytes) -> bytes:
    """A length-delimited field; proto3 writes none for empty bytes or an empty string."""
    return delimited(key, raw) if raw else b""


def _text(key: bytes, text: str) -> bytes:
    return _run(key, text.encode())


# (tip_id, arm, generation_id, prompt_version) of a LoggedCandidate, taken in C.
_CANDIDATE_KEY: Callable[[LoggedCandidate], tuple[str, str, str, str]] = operator.itemgetter(
    0, 1, 4, 5
)


def _candidate_entry(c: LoggedCandidate) -> bytes:
    """One `candidates` entry, its key and length included (scores travel apart)."""
    key = _CANDIDATE_KEY(c)
    found = _CANDIDATE_BYTES.get(key)
    if found is None:
        body = b"".join(
            (
                _text(_C_TIP, c.tip_id),
                _text(_C_ARM, "" if c.arm == c.tip_id else c.arm),
                _text(_C_GENERATION, c.generation_id),
                _text(_C_PROMPT, c.prompt_version),
            )
        )
        if len(_CANDIDATE_BYTES) >= _CANDIDATE_BYTES_MAX:
            _CANDIDATE_BYTES.clear()
        found = _CANDIDATE_BYTES[key] = delimited(_D_CANDIDATES, body)
    return found


def serialize_decision(r: DecisionRecord) -> bytes:
    """`encode_decision` before its compression: what the SQLite store hands its decision
    writer, which compresses it (`compress_decision`) off the event loop."""
    if not 0 <= r.chosen_index < _UINT32:
        raise ValueError(f"chosen_index {r.chosen_index} does not fit a uint32")
    candidates = r.candidates
    parts = [_D_HEAD, _text(_D_FEATURE_VERSION, r.feature_version)]
    remembered = list(map(_CANDIDATE_BYTES.get, map(_CANDIDATE_KEY, candidates)))
    if None in remembered:  # a candidate not seen lately
        parts += [_candidate_entry(c) for c in candidates]
    else:
        parts += cast(list[bytes], remembered)
    if r.chosen_index:
        parts.append(_D_CHOSEN + varint(r.chosen_index))
    if r.explored:
        parts.append(_D_EXPLORED + b"\x01")
    parts.append(_run(_D_X32, _float32s(r.x.tolist() if isinstance(r.x, np.ndarray) else r.x)))
    parts.append(_run(_D_SCORES32, _float32s(list(map(_SCORE, candidates)))))
    parts.append(_run(_D_PROPENSITIES32, _float32s(list(map(_PROPENSITY, candidates)))))
    return b"".join(parts)


_PACK_F32: dict[int, struct.Struct] = {}
_PACKS_KEPT = 256


def _float32s(values: Sequence[float]) -> bytes:
    """Little-endian float32s, as NumPy casts them. `struct` rounds the same way (a C cast)
    without NumPy's per-call dispatch, which costs several microseconds between requests;
    it refuses a finite value beyond float32's range, which NumPy makes infinite."""
    n = len(values)
    pack = _PACK_F32.get(n)
    if pack is None:
        pack = struct.Struct(f"<{n}f")
        if n <= _PACKS_KEPT:  # candidates and feature dimensions: a few sizes
            _PACK_F32[n] = pack
    try:
        return pack.pack(*values)
    except OverflowError:
        with np.errstate(over="ignore"):
            return np.asarray(values, dtype=np.float64).astype(_F32).tobytes()


def compress_decision(serialized: bytes) -> bytes:
    """zlib at its fastest level (about 6 us) takes a third off: tip ids and arm names
    repeat, and most propensities are equal. The SQLite decision writer runs the same call
    (`decision_writer.COMPRESS_LEVEL`, stdlib only), so both give the same bytes."""
    return zlib.compress(serialized, COMPRESS_LEVEL)


# A zlib stream opens with 0x78; a serialised Decision opens with field 1's tag, 0x08
# (format_version is never 0), so the first byte tells the two framings apart.
_ZLIB = 0x78


def decode_decision(data: bytes, key: DecisionKey | None = None) -> DecisionRecord:
    """A logged decision; `key` gives the columns a format-2 record leaves out."""
    return _readable("Decision", lambda d: _decode_decision(_inflate(d), key), data)


def _inflate(data: bytes) -> bytes:
    if data[:1] == bytes([_ZLIB]):
        try:
            return zlib.decompress(data)
        except zlib.error as e:
            raise ValueError(f"compressed decision does not inflate: {e}") from None
    return data


def _floats(raw: bytes, n: int, what: str) -> list[float]:
    values = np.frombuffer(raw, dtype=_F32).astype(np.float64)
    if len(values) != n:
        raise ValueError(f"{what} holds {len(values)} values for {n}")
    return values.tolist()  # type: ignore[no-any-return]


def _decode_decision(data: bytes, key: DecisionKey | None) -> DecisionRecord:
    msg = state_pb2.Decision.FromString(data)
    _check(msg.format_version, "Decision", DECISION_FORMAT)
    n = len(msg.candidates)
    if msg.format_version >= 2:
        if key is None:
            raise ValueError("a format-2 decision needs its key columns")
        x = np.frombuffer(msg.x32, dtype=_F32).astype(np.float64)
        scores = _floats(msg.scores32, n, "scores32")
        props = _floats(msg.propensities32, n, "propensities32")
        decision_id, user_id, policy, created_at = (
            key.decision_id,
            key.user_id,
            key.policy,
            key.created_at,
        )
    else:
        x = np.array(msg.x, dtype=np.float64)
        scores = [c.score for c in msg.candidates]
        props = [c.propensity for c in msg.candidates]
        decision_id, user_id, policy = msg.decision_id, msg.user_id, msg.policy
        created_at = msg.created_at_ms / 1000.0
    if n and not 0 <= msg.chosen_index < n:
        raise ValueError(f"chosen_index {msg.chosen_index} out of {n} candidates")
    return DecisionRecord(
        decision_id=decision_id,
        user_id=user_id,
        policy=policy,
        feature_version=msg.feature_version,
        x=x,
        candidates=tuple(
            LoggedCandidate(
                tip_id=c.tip_id,
                arm=c.arm or c.tip_id,
                score=scores[i],
                propensity=props[i],
                generation_id=c.generation_id,
                prompt_version=c.prompt_version,
            )
            for i, c in enumerate(msg.candidates)
        ),
        chosen_index=msg.chosen_index,
        explored=msg.explored,
        created_at=created_at,
        # Format 1 kept the shadows' views in the record; format 2 stores them apart.
        shadow_vectors=_vectors(msg.shadow_vectors),
        shadows=_views(msg.shadows),
    )


def encode_shadow_views(views: Sequence[ShadowView], vectors: Mapping[str, Vector]) -> bytes:
    msg = state_pb2.ShadowViews()
    for s in views:
        msg.shadows.add(
            policy=s.policy,
            chosen_arm=s.chosen_arm,
            logged_arm_propensity=s.logged_arm_propensity,
            propensities=s.propensities,
            estimates=s.estimates,
        )
    for version in sorted(vectors):
        msg.shadow_vectors.add(feature_version=version, x=vectors[version].tolist())
    return msg.SerializeToString(deterministic=True)


def decode_shadow_views(data: bytes) -> tuple[tuple[ShadowView, ...], dict[str, Vector]]:
    return _readable("ShadowViews", _decode_shadow_views, data)


def _decode_shadow_views(data: bytes) -> tuple[tuple[ShadowView, ...], dict[str, Vector]]:
    msg = state_pb2.ShadowViews.FromString(data)
    return _views(msg.shadows), _vectors(msg.shadow_vectors)


def _views(shadows: Iterable[state_pb2.ShadowDecision]) -> tuple[ShadowView, ...]:
    return tuple(
        ShadowView(
            policy=s.policy,
            chosen_arm=s.chosen_arm,
            logged_arm_propensity=s.logged_arm_propensity,
            propensities=tuple(s.propensities),
            estimates=tuple(s.estimates),
        )
        for s in shadows
    )


def _vectors(vectors: Iterable[state_pb2.FeatureVector]) -> dict[str, Vector]:
    return {v.feature_version: np.array(v.x, dtype=np.float64) for v in vectors}

"""Conversion of learned state and decisions to and from their versioned proto forms.

This is the only module that knows `oo.state.v1`; stores persist the bytes it makes, and
the domain never sees a proto. A reader refuses a `format_version` newer than it knows
rather than guess at it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError

from oo.state.v1 import state_pb2
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate, ShadowView
from oo_ml.domain.features import Vector
from oo_ml.domain.state import FORMAT_VERSION, ArmModel, PolicyState
from oo_ml.errors import UnreadableRecord, UnsupportedFormat

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


def encode_state(s: PolicyState) -> bytes:
    msg = state_pb2.PolicyState(
        format_version=FORMAT_VERSION,
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


def decode_state(data: bytes) -> PolicyState:
    return _readable("PolicyState", _decode_state, data)


def _decode_state(data: bytes) -> PolicyState:
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
    return PolicyState(
        policy=msg.policy,
        feature_version=msg.feature_version,
        dim=d,
        ridge_lambda=msg.ridge_lambda,
        decisions=msg.decisions,
        rewards=msg.rewards,
        arms=arms,
    )


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


def serialize_decision(r: DecisionRecord) -> bytes:
    """`encode_decision` before its compression: what the SQLite store hands its decision
    writer, which compresses it (`compress_decision`) off the event loop."""
    msg = state_pb2.Decision(
        format_version=DECISION_FORMAT,
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

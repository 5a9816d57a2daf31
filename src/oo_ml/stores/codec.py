"""Conversion of learned state and decisions to and from their versioned proto forms.

This is the only module that knows `oo.state.v1`; stores persist the bytes it makes, and
the domain never sees a proto. A reader refuses a `format_version` newer than it knows
rather than guess at it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def _check(version: int, what: str) -> None:
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(f"{what} format_version {version} is newer than {FORMAT_VERSION}")


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


def encode_decision(r: DecisionRecord) -> bytes:
    msg = state_pb2.Decision(
        format_version=FORMAT_VERSION,
        decision_id=r.decision_id,
        user_id=r.user_id,
        policy=r.policy,
        feature_version=r.feature_version,
        x=r.x.tolist(),
        chosen_index=r.chosen_index,
        explored=r.explored,
        created_at_ms=round(r.created_at * 1000),
    )
    for c in r.candidates:
        msg.candidates.add(
            tip_id=c.tip_id,
            arm=c.arm,
            score=c.score,
            propensity=c.propensity,
            generation_id=c.generation_id,
            prompt_version=c.prompt_version,
        )
    for version in sorted(r.shadow_vectors):
        msg.shadow_vectors.add(feature_version=version, x=r.shadow_vectors[version].tolist())
    for s in r.shadows:
        msg.shadows.add(
            policy=s.policy,
            chosen_arm=s.chosen_arm,
            logged_arm_propensity=s.logged_arm_propensity,
            propensities=s.propensities,
            estimates=s.estimates,
        )
    return msg.SerializeToString(deterministic=True)


def decode_decision(data: bytes) -> DecisionRecord:
    return _readable("Decision", _decode_decision, data)


def _decode_decision(data: bytes) -> DecisionRecord:
    msg = state_pb2.Decision.FromString(data)
    _check(msg.format_version, "Decision")
    return DecisionRecord(
        decision_id=msg.decision_id,
        user_id=msg.user_id,
        policy=msg.policy,
        feature_version=msg.feature_version,
        x=np.array(msg.x, dtype=np.float64),
        candidates=tuple(
            LoggedCandidate(
                tip_id=c.tip_id,
                arm=c.arm,
                score=c.score,
                propensity=c.propensity,
                generation_id=c.generation_id,
                prompt_version=c.prompt_version,
            )
            for c in msg.candidates
        ),
        chosen_index=msg.chosen_index,
        explored=msg.explored,
        created_at=msg.created_at_ms / 1000.0,
        shadow_vectors={
            v.feature_version: np.array(v.x, dtype=np.float64) for v in msg.shadow_vectors
        },
        shadows=tuple(
            ShadowView(
                policy=s.policy,
                chosen_arm=s.chosen_arm,
                logged_arm_propensity=s.logged_arm_propensity,
                propensities=tuple(s.propensities),
                estimates=tuple(s.estimates),
            )
            for s in msg.shadows
        ),
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
    views = tuple(
        ShadowView(
            policy=s.policy,
            chosen_arm=s.chosen_arm,
            logged_arm_propensity=s.logged_arm_propensity,
            propensities=tuple(s.propensities),
            estimates=tuple(s.estimates),
        )
        for s in msg.shadows
    )
    vectors = {v.feature_version: np.array(v.x, dtype=np.float64) for v in msg.shadow_vectors}
    return views, vectors

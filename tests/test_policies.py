"""Pure policy and state behaviour: Sherman-Morrison, determinism, exact resume, migration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from oo_ml import config as config_mod
from oo_ml.domain import policies
from oo_ml.domain.features import FEATURE_VERSIONS, Inputs, assemble
from oo_ml.domain.policies import build_policies
from oo_ml.domain.rng import rng_for
from oo_ml.domain.state import ArmModel, empty_state
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.codec import decode_state, encode_state

POLICIES = build_policies(config_mod.load(env={}).scoring)
ARMS = ["a", "b", "c", "d"]


def trained(policy: str, rounds: int = 60, seed: int = 3):  # type: ignore[no-untyped-def]
    p = POLICIES[policy]
    fv = FEATURE_VERSIONS[p.feature_version]
    state = empty_state(policy, fv.name, fv.dim, 1.0).with_arms(ARMS)
    rnd = np.random.default_rng(seed)
    for i in range(rounds):
        x = fv.vectorise(
            assemble(ALL_FEATURES, Inputs({"hour_of_day": float(i % 24)}), {}, now=0.0)
        )
        arm = ARMS[int(rnd.integers(4))]
        state = state.chose(arm).learned(arm, x, float(rnd.random() < 0.5))
    return p, fv, state


def test_sherman_morrison_matches_the_direct_inverse() -> None:
    rnd = np.random.default_rng(0)
    model = ArmModel.fresh(12, 2.0)
    xs = rnd.normal(size=(50, 12))
    rs = rnd.normal(size=50)
    for x, r in zip(xs, rs, strict=True):
        model = model.learn(x, float(r))
    a = 2.0 * np.eye(12) + xs.T @ xs
    np.testing.assert_allclose(model.a_inv, np.linalg.inv(a), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(model.theta, np.linalg.solve(a, xs.T @ rs), rtol=1e-8, atol=1e-10)
    assert model.rewarded == 50 and math.isclose(model.reward_sum, float(rs.sum()))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_same_state_and_decision_id_give_the_same_choice(policy: str) -> None:
    p, fv, state = trained(policy)
    x = fv.vectorise(assemble(ALL_FEATURES, Inputs({"hour_of_day": 7.0}), {}, now=0.0))
    picks = set()
    for i in range(40):
        first = p.select(state, x, ARMS, rng_for(f"decision-{i}"))
        again = p.select(state, x, ARMS, rng_for(f"decision-{i}"))
        assert first == again
        # A reload from the persisted form decides exactly the same.
        reloaded = decode_state(encode_state(state))
        assert p.select(reloaded, x, ARMS, rng_for(f"decision-{i}")) == first
        assert math.isclose(sum(first.propensities), 1.0)
        assert first.propensities[first.chosen] > 0
        picks.add(first.chosen)
    if not p.deterministic:
        assert len(picks) > 1  # different ids do draw differently


def test_deterministic_policy_gives_its_choice_propensity_one() -> None:
    # Only without the minimum exploration (OO_MIN_EXPLORATION=0) is linucb deterministic.
    unmixed = build_policies(config_mod.load(env={"OO_MIN_EXPLORATION": "0"}).scoring)
    _, fv, state = trained("linucb")
    p = unmixed["linucb"]
    assert p.deterministic
    x = fv.vectorise(assemble(ALL_FEATURES, Inputs({"hour_of_day": 7.0}), {}, now=0.0))
    sel = p.select(state, x, ARMS, rng_for("d"))
    assert sel.propensities[sel.chosen] == 1.0 and sum(sel.propensities) == 1.0


def test_served_linucb_mixes_in_the_minimum_exploration() -> None:
    # With the default OO_MIN_EXPLORATION m = 0.05 and K = 4 arms, linucb's choice has
    # propensity (1 - m) * 1 + m / 4 = 0.9625 and every other arm m / 4 = 0.0125: the logs
    # give every candidate support (this test asserted 1 and 0 before the mixing).
    p, fv, state = trained("linucb")
    assert not p.deterministic
    x = fv.vectorise(assemble(ALL_FEATURES, Inputs({"hour_of_day": 7.0}), {}, now=0.0))
    sel = p.select(state, x, ARMS, rng_for("d"))
    assert sel.propensities[sel.chosen] == pytest.approx(0.9625)
    assert sorted(sel.propensities)[:3] == pytest.approx([0.0125] * 3)
    assert sum(sel.propensities) == pytest.approx(1.0)


@pytest.mark.parametrize("policy", ["egreedy", "linucb", "lints"])
def test_mixed_propensities_are_the_choice_frequencies(policy: str) -> None:
    """Over many decision ids on one state and context, each arm is chosen as often as its
    logged propensity says, and `explored` covers every uniform redraw that left the
    policy's own choice."""
    p, fv, state = trained(policy)
    x = fv.vectorise(assemble(ALL_FEATURES, Inputs({"hour_of_day": 7.0}), {}, now=0.0))
    n = 4000
    counts = np.zeros(len(ARMS))
    props = None
    for i in range(n):
        sel = p.select(state, x, ARMS, rng_for(f"mix-{i}"))
        counts[sel.chosen] += 1
        props = np.array(sel.propensities)
        if policy == "linucb" and sel.propensities[sel.chosen] < 0.5:
            assert sel.explored  # only a uniform redraw picks an arm linucb would not
    assert props is not None and props.min() >= 0.05 / len(ARMS) - 1e-12
    # Binomial standard error at n = 4000 is at most 0.008: allow 4 of them.
    np.testing.assert_allclose(counts / n, props, atol=0.032)


def test_mixing_off_draws_exactly_as_before() -> None:
    """OO_MIN_EXPLORATION=0 adds no draw: decisions are those of the unmixed policies."""
    from oo_ml.domain.policies import EpsilonGreedy

    off = build_policies(config_mod.load(env={"OO_MIN_EXPLORATION": "0"}).scoring)
    bare = EpsilonGreedy("egreedy", "v1", 0.1)
    _, fv, state = trained("egreedy")
    x = fv.vectorise(assemble(ALL_FEATURES, Inputs({"hour_of_day": 9.0}), {}, now=0.0))
    for i in range(50):
        assert off["egreedy"].select(state, x, ARMS, rng_for(f"{i}")) == bare.select(
            state, x, ARMS, rng_for(f"{i}")
        )


def test_v1_state_migrates_to_v2_by_padding() -> None:
    _, v1, state = trained("egreedy")
    v2 = FEATURE_VERSIONS["v2"]
    migrated = state.migrated("v2", v2.dim)
    feats = assemble(ALL_FEATURES, Inputs({"hour_of_day": 15.0}), {}, now=0.0)
    x1 = v1.vectorise(feats)
    x2 = v2.vectorise(feats)
    np.testing.assert_array_equal(x2[:7], x1)  # v2 extends v1
    for arm in ARMS:
        old, new = state.arms[arm], migrated.arms[arm]
        np.testing.assert_array_equal(new.a_inv[:7, :7], old.a_inv)
        np.testing.assert_array_equal(new.a_inv[7:, 7:], np.eye(5))  # lambda = 1
        np.testing.assert_array_equal(new.a_inv[:7, 7:], 0)
        np.testing.assert_array_equal(new.b[:7], old.b)
        np.testing.assert_array_equal(new.b[7:], 0)
        assert (new.pulls, new.rewarded) == (old.pulls, old.rewarded)
        # What was learned still predicts the same on the shared dimensions.
        assert math.isclose(
            float(new.theta @ np.concatenate([x1, np.zeros(5)])), float(old.theta @ x1)
        )
    with pytest.raises(ValueError, match="cannot shrink"):
        migrated.migrated("v1", 7)


def test_feature_dimensions() -> None:
    feats = assemble(ALL_FEATURES, Inputs({}), {}, now=0.0)
    assert FEATURE_VERSIONS["v1"].vectorise(feats).shape == (7,)
    assert FEATURE_VERSIONS["v2"].vectorise(feats).shape == (12,)


def test_arms_beyond_the_cap_evict_the_least_used_outside_the_request() -> None:
    _, _, state = trained("egreedy")  # arms a, b, c, d, each used
    state = state.with_arms(["new-1", "new-2"], max_arms=4)
    assert set(state.arms) >= {"new-1", "new-2"} and len(state.arms) == 4
    used = {
        a: trained("egreedy")[2].arms[a].pulls + trained("egreedy")[2].arms[a].rewarded
        for a in ARMS
    }
    kept = sorted(set(state.arms) - {"new-1", "new-2"})
    assert kept == sorted(sorted(ARMS, key=lambda a: -used[a])[:2])
    # The request's own arms are never evicted, even past the cap.
    assert len(state.with_arms([*ARMS, "x"], max_arms=2).arms) == 5


def test_the_decision_rng_replays_and_is_uniform() -> None:
    a, b = rng_for("d-1", "s"), rng_for("d-1", "s")
    draws_a = [a.random() for _ in range(20)] + [a.integers(7) for _ in range(20)]
    draws_b = [b.random() for _ in range(20)] + [b.integers(7) for _ in range(20)]
    assert draws_a == draws_b  # the same id replays
    assert [rng_for("d-2", "s").random() for _ in range(3)] != draws_a[:3]
    assert rng_for("d-1", "other").random() != draws_a[0]  # the salt separates streams
    # One draw per decision id, as the policies take them: uniform across ids.
    first = np.array([rng_for(f"id-{i}").random() for i in range(20_000)])
    assert abs(first.mean() - 0.5) < 0.01 and abs(first.var() - 1 / 12) < 0.005
    counts = np.bincount([rng_for(f"id-{i}").integers(4) for i in range(20_000)], minlength=4)
    assert counts.min() > 4_750 and counts.max() < 5_250  # 5,000 +- 3.5 sd
    for size in (5, (256, 4)):  # hashed Box-Muller and the keyed Philox path
        normals = np.concatenate(
            [rng_for(f"n-{i}").standard_normal(size).ravel() for i in range(2_000)]
        )
        assert abs(normals.mean()) < 0.05 and abs(normals.std() - 1) < 0.05
    assert np.array_equal(rng_for("x").standard_normal(5), rng_for("x").standard_normal(5))


def test_stacked_scores_are_each_arms_own_in_any_candidate_order() -> None:
    """The stacked arrays, and the rows a state remembers per candidate list, give each
    candidate its own arm's estimate and width, whatever the order, subset or repeats, and
    however many lists the state has seen (the memo is bounded and cleared)."""
    _, fv, state = trained("linucb")
    st = state.stacked()
    x = np.linspace(0.1, 1.0, fv.dim)
    lists = [ARMS, ARMS[::-1], ARMS[1:3], ["c", "c", "a"], ["d"]]
    lists += [list(np.random.default_rng(s).permutation(ARMS)) for s in range(20)]
    for arms in lists * 2:
        theta, a_inv, sd = st.of(arms)
        for i, arm in enumerate(arms):
            model = state.arms[arm]
            np.testing.assert_allclose(theta[i] @ x, model.a_inv @ model.b @ x, rtol=1e-12)
            np.testing.assert_allclose(x @ a_inv[i] @ x, x @ model.a_inv @ x, rtol=1e-12)
            p = (model.reward_sum + 1.0) / (model.rewarded + 2.0)
            assert sd[i] == math.sqrt(p * (1.0 - p))
    assert st.rows(ARMS) is None  # every arm, in stacking order: nothing to gather
    assert st.rows(tuple(ARMS)) is None
    assert st.rows(ARMS[1:]) is not None
    assert len(st._rows) <= 8


@given(
    st.lists(
        st.sampled_from([0.0, -0.0, 1.0, 1.0 + 5e-13, 1.0 - 5e-13, 2.0, -1.0])
        | st.floats(allow_nan=True, allow_infinity=True),
        min_size=1,
        max_size=12,
    )
)
def test_the_greedy_set_is_every_score_within_the_tie_of_the_top(scores: list[float]) -> None:
    """`_greedy`'s list fast paths (one top, all tied) and its array path agree with the
    definition: the indices whose score is within _TIE of the maximum (NumPy's comparisons,
    NaN included)."""
    arr = np.asarray(scores, dtype=np.float64)
    expected = tuple(np.flatnonzero(arr >= arr.max() - policies._TIE).tolist())
    assert policies._greedy(scores) == expected

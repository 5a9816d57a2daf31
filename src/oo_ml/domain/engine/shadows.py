"""Shadow policies: scored after the served answer, learning from the served policy's
rewards, with an off-policy value estimate accumulated per rewarded sample.

A shadow never changes what the user sees. Its view of a decision (its choice, its
propensities and its model's estimates for every logged candidate) is attached to the
logged decision; when that decision is rewarded, the shadow's model learns from the
served policy's data (without counting the pull as its own) and the sample's IPS and DR
terms are added to the (served, shadow) accumulators that `Stats.shadows` reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from oo_ml.domain.decisions import DecisionRecord, ShadowView
from oo_ml.domain.engine.models import Models, fit
from oo_ml.domain.features import FEATURE_VERSIONS, Assembled, Vector
from oo_ml.domain.ope import sample_terms
from oo_ml.domain.policies import Policy, estimates
from oo_ml.domain.ports import AddOffPolicy, PutState, ReplaceDecision, Store, Write
from oo_ml.domain.rng import rng_for


class Shadows:
    def __init__(
        self,
        policies: Mapping[str, Policy],
        names: Sequence[str],
        models: Models,
        store: Store,
    ) -> None:
        self.policies = policies
        self.names = tuple(names)
        self.models = models
        self.store = store

    def of(self, served: str) -> list[Policy]:
        """The shadows behind a served policy (every configured one but itself)."""
        return [self.policies[s] for s in self.names if s != served]

    async def score(
        self, record: DecisionRecord, assembled: Assembled, shadows: Sequence[Policy]
    ) -> None:
        """Each shadow's view of a served decision, attached to its log entry."""
        arms = [c.arm for c in record.candidates]
        views = []
        vectors: dict[str, Vector] = {}
        for shadow in shadows:
            x = FEATURE_VERSIONS[shadow.feature_version].vectorise(assembled)
            if shadow.feature_version != record.feature_version:
                vectors[shadow.feature_version] = x
            _, state = await self.models.load(record.user_id, shadow)
            state = self.models.with_arms(state, shadow.name, arms)
            sel = shadow.select(state, x, arms, rng_for(record.decision_id, shadow.name))
            views.append(
                ShadowView(
                    policy=shadow.name,
                    chosen_arm=arms[sel.chosen],
                    logged_arm_propensity=sel.propensities[record.chosen_index],
                    propensities=sel.propensities,
                    estimates=tuple(estimates(state, x, arms).tolist()),
                )
            )
        updated = replace(record, shadows=tuple(views), shadow_vectors=vectors)
        await self.store.commit([ReplaceDecision(updated)])

    async def reward_writes(self, record: DecisionRecord, reward: float) -> list[Write]:
        """The shadows' learning and off-policy samples for a rewarded decision."""
        arm = record.chosen.arm
        writes: list[Write] = []
        for view in record.shadows:
            shadow = self.policies.get(view.policy)
            if shadow is None:
                continue
            revision, state = await self.models.load(record.user_id, shadow)
            state = self.models.with_arms(state, shadow.name, [arm])
            x = record.shadow_vectors.get(shadow.feature_version, record.x)
            # Learn from the served policy's data without counting it as the shadow's pull.
            model = state.arms[arm].learn(fit(x, state.dim), reward)
            model = replace(
                model, rewarded=state.arms[arm].rewarded, reward_sum=state.arms[arm].reward_sum
            )
            state = replace(state, arms={**state.arms, arm: model})
            writes.append(PutState(record.user_id, shadow.name, revision, state))
            writes.append(off_policy_sample(record, view, reward))
        return writes


def off_policy_sample(record: DecisionRecord, view: ShadowView, reward: float) -> AddOffPolicy:
    weight, dr = sample_terms(
        view.propensities, view.estimates, record.chosen_index, record.chosen.propensity, reward
    )
    return AddOffPolicy(record.policy, view.policy, weight, reward, dr)

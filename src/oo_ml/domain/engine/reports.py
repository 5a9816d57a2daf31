"""Stats: per-user and per-policy reports over the models and the decision log."""

from __future__ import annotations

import time
from collections.abc import Callable

from oo_ml.domain.contracts import Contracts
from oo_ml.domain.engine.decision_log import DecisionLog
from oo_ml.domain.engine.models import Models, fit
from oo_ml.domain.engine.types import ArmReport, PromptReport, StatsReport
from oo_ml.domain.features import FEATURE_VERSIONS, FeatureStore, Inputs, assemble
from oo_ml.domain.ope import OffPolicyEstimate, from_sums
from oo_ml.domain.policies import Policy
from oo_ml.domain.ports import OffPolicyTotals, PromptTotals, Store


class Reports:
    def __init__(
        self,
        store: Store,
        features: FeatureStore,
        contracts: Contracts,
        models: Models,
        decisions: DecisionLog,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.features = features
        self.contracts = contracts
        self.models = models
        self.decisions = decisions
        self.clock = clock

    async def stats(self, user_id: str, policy: Policy) -> StatsReport:
        """A user's report under the policy, or the policy's aggregate when user_id is ""."""
        # Stats reads the store: what the write-behind log holds is committed first (a
        # shared fsync), so every decision answered so far is counted.
        await self.decisions.durable()
        fv = FEATURE_VERSIONS[policy.feature_version]
        now = self.clock()
        stored = await self.features.stored_features(user_id, now) if user_id else {}
        assembled = assemble(self.contracts, Inputs({}), stored, now)
        x = fv.vectorise(assembled)
        if user_id:
            # A user's figures only: server-wide ones (users, shadows, ingest) are the
            # policy-level answer's.
            _, state = await self.models.load(user_id, policy)
            # Pulls: counted beside the log since Score stopped writing models, plus what
            # the model counted before that (`pulls` in its blob).
            logged = await self.store.pulls(user_id, policy.name)
            names = sorted(set(state.arms) | set(logged))
            xs = fit(x, state.dim)
            arms = []
            for a in names:
                m = state.arms.get(a)
                pulls = logged.get(a, 0) + (m.pulls if m else 0)
                if m is None:
                    arms.append(ArmReport(a, pulls, 0, 0.0, 0.0))
                else:
                    arms.append(ArmReport(a, pulls, m.rewarded, m.reward_sum, float(m.theta @ xs)))
            return StatsReport(
                user_id=user_id,
                policy=policy.name,
                feature_version=state.feature_version,
                decisions=state.decisions + sum(logged.values()),
                arms=arms,
                prompts=_prompts(await self.store.prompt_totals(policy.name, user_id)),
                shadows=[],
                features=assembled,
                users=0,
                pending=await self.store.pending_count(user_id, policy.name),
            )
        shadows = [shadow_report(t) for t in await self.store.off_policy_totals(policy.name)]
        totals = await self.store.policy_totals(policy.name)
        prior = self.models.priors.get(policy.name)
        arms = [
            ArmReport(
                t.arm,
                t.pulls,
                t.rewarded,
                t.reward_sum,
                float(prior.arms[t.arm].theta @ x) if prior and t.arm in prior.arms else 0.0,
            )
            for t in totals.arms
        ]
        return StatsReport(
            user_id="",
            policy=policy.name,
            feature_version=fv.name,
            decisions=sum(a.pulls for a in arms),
            arms=arms,
            prompts=_prompts(await self.store.prompt_totals(policy.name, None)),
            shadows=shadows,
            features=assembled,
            users=totals.users,
            pending=totals.pending,
        )


def _prompts(totals: list[PromptTotals]) -> list[PromptReport]:
    return [PromptReport(p.prompt_version, p.served, p.rewarded, p.reward_sum) for p in totals]


def shadow_report(t: OffPolicyTotals) -> OffPolicyEstimate:
    # SNIPS's CI only when the squared-weight sums cover every sample (ADR 0015).
    squared = t.sq_n == t.n
    return from_sums(
        t.shadow,
        t.n,
        weight_sum=t.weight_sum,
        weighted_reward_sum=t.weighted_reward_sum,
        dr_sum=t.dr_sum,
        dr_sq_sum=t.dr_sq_sum,
        reward_sum=t.reward_sum,
        weight_sq_sum=t.weight_sq_sum if squared else None,
        weight_sq_reward_sum=t.weight_sq_reward_sum if squared else None,
        weight_sq_reward_sq_sum=t.weight_sq_reward_sq_sum if squared else None,
    )

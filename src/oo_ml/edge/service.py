"""The gRPC handlers of `oo.scoring.v1.ScoringService`: they only translate.

Each handler validates the request against the proto rules, turns it into domain values,
calls the engine (or the generator), and turns the result back into a response. Errors
are domain exceptions; `interceptors.py` maps them to statuses.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping

import grpc

from oo.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from oo_ml.domain.engine import Candidate, ScoreCommand, ScoringEngine, StatsReport
from oo_ml.domain.features import Assembled, Inputs, Origin
from oo_ml.domain.ports import GenerationRecord
from oo_ml.generate.generator import Generation, Generator
from oo_ml.schema.contracts import CONTEXT_FEATURES, PROFILE_FEATURES
from oo_ml.schema.validation import validate
from oo_ml.schema.wire import delimited, tag

_CANDIDATES = scoring_pb2.ScoreRequest.DESCRIPTOR.fields_by_name["candidates"].full_name


# Every contracted feature, absent until the request sets it (copied per request).
_ABSENT: dict[str, float | None] = {c.name: None for c in (*CONTEXT_FEATURES, *PROFILE_FEATURES)}
# The wire enum of each origin, looked up once, not by name per response.
_ORIGIN = {o: scoring_pb2.FeatureOrigin.Value(f"FEATURE_ORIGIN_{o.name}") for o in Origin}


def inputs_of(context: scoring_pb2.Context, profile: scoring_pb2.ProfileFeatures) -> Inputs:
    """The request's feature values; absent optional fields stay None."""
    values = dict(_ABSENT)
    # ListFields gives the set fields only: one call per message, no lookups by name.
    for msg in (context, profile):
        for field, value in msg.ListFields():
            if field.name in values:
                values[field.name] = float(value)
    return Inputs(values=values, timezone=context.timezone)


_FEATURES_TAG = tag(scoring_pb2.ScoreResponse.DESCRIPTOR.fields_by_name["features"].number, 2)
# Each (name, value, origin) as ScoreResponse.features wire bytes. Building nine
# FeatureValue messages cost about a tenth of a Score; most values repeat (hours,
# fallbacks, a user's profile between events), so their bytes are made once and the
# response parses them in C. Bounded: cleared when full.
_FEATURE_BYTES: dict[tuple[str, float, Origin], bytes] = {}
_FEATURE_BYTES_MAX = 50_000


def feature_bytes(assembled: Assembled) -> bytes:
    """The assembled features as the wire bytes of ScoreResponse.features."""
    origins = assembled.origins
    cache = _FEATURE_BYTES
    parts = []
    for name, value in assembled.values.items():
        key = (name, value, origins[name])
        encoded = cache.get(key)
        if encoded is None:
            if len(cache) >= _FEATURE_BYTES_MAX:
                cache.clear()
            body = scoring_pb2.FeatureValue(
                name=name, value=value, origin=_ORIGIN[origins[name]]
            ).SerializeToString()
            encoded = cache[key] = delimited(_FEATURES_TAG, body)
        parts.append(encoded)
    return b"".join(parts)


def feature_values(assembled: Assembled) -> list[scoring_pb2.FeatureValue]:
    origins = assembled.origins
    return [
        scoring_pb2.FeatureValue(name=name, value=value, origin=_ORIGIN[origins[name]])
        for name, value in assembled.values.items()
    ]


def stats_response(r: StatsReport) -> scoring_pb2.StatsResponse:
    return scoring_pb2.StatsResponse(
        user_id=r.user_id,
        policy=r.policy,
        feature_version=r.feature_version,
        decisions=r.decisions,
        rewarded=r.rewarded,
        reward_sum=r.reward_sum,
        mean_reward=r.mean_reward,
        arms=[
            scoring_pb2.ArmStats(
                arm=a.arm,
                pulls=a.pulls,
                rewarded=a.rewarded,
                reward_sum=a.reward_sum,
                mean_reward=a.mean_reward,
                estimate=a.estimate,
            )
            for a in r.arms
        ],
        prompt_versions=[
            scoring_pb2.PromptVersionStats(
                prompt_version=p.prompt_version,
                served=p.served,
                rewarded=p.rewarded,
                reward_sum=p.reward_sum,
                mean_reward=p.mean_reward,
            )
            for p in r.prompts
        ],
        shadows=[
            scoring_pb2.ShadowStats(
                policy=s.policy,
                samples=s.samples,
                ips=s.ips,
                snips=s.snips,
                dr=s.dr,
                dr_ci_low=s.dr_ci_low,
                dr_ci_high=s.dr_ci_high,
                served_mean=s.served_mean,
                snips_ci_low=s.snips_ci_low,
                snips_ci_high=s.snips_ci_high,
            )
            for s in r.shadows
        ],
        features=feature_values(r.features),
        users=r.users,
        pending=r.pending,
    )


def generate_response(g: Generation) -> scoring_pb2.GenerateResponse:
    return scoring_pb2.GenerateResponse(
        text=g.text,
        prompt_version=g.prompt_version,
        model=g.model,
        fallback=g.fallback,
        fallback_reason=g.fallback_reason,
        latency_ms=g.latency_ms,
        usage=scoring_pb2.TokenUsage(
            prompt_tokens=g.prompt_tokens,
            completion_tokens=g.completion_tokens,
            total_tokens=g.total_tokens,
        ),
        generation_id=g.generation_id,
    )


class ScoringService(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(
        self,
        engine: ScoringEngine,
        generator: Generator,
        max_candidates: int,
        ingest_stats: Callable[[], Mapping[str, int]] = dict,
        server_id: str = "",
    ) -> None:
        self.engine = engine
        self.server_id = server_id
        self.generator = generator
        self.ingest_stats = ingest_stats
        self._limits = {_CANDIDATES: max_candidates}

    async def Score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> scoring_pb2.ScoreResponse:
        validate(request, self._limits)
        cmd = ScoreCommand(
            user_id=request.user_id,
            candidates=tuple(
                Candidate(c.tip_id, c.arm or c.tip_id, c.generation_id, c.prompt_version)
                for c in request.candidates
            ),
            inputs=inputs_of(request.context, request.profile_features),
            policy=request.policy,
        )
        result = await self.engine.score(cmd)
        record = result.record
        response = scoring_pb2.ScoreResponse(
            decision_id=record.decision_id,
            chosen_tip_id=record.chosen.tip_id,
            policy=record.policy,
            explored=record.explored,
            feature_version=record.feature_version,
        )
        # add() fills each entry in place: about half the cost of building ScoredCandidate
        # messages and copying them into the repeated field.
        add = response.ranking.add
        for c in result.ranking():
            add(tip_id=c.tip_id, arm=c.arm, score=c.score, propensity=c.propensity)
        response.MergeFromString(feature_bytes(result.features))
        return response

    async def Reward(
        self, request: scoring_pb2.RewardRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> scoring_pb2.RewardResponse:
        validate(request)
        result = await self.engine.reward(request.decision_id, request.reward)
        return scoring_pb2.RewardResponse(
            applied=result.applied, policy=result.policy, arm=result.arm
        )

    async def Stats(
        self, request: scoring_pb2.StatsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> scoring_pb2.StatsResponse:
        validate(request)
        response = stats_response(await self.engine.stats(request.user_id, request.policy))
        response.server = self.server_id
        if not request.user_id:  # server-wide counters belong to the server-level answer
            response.ingest.update(self.ingest_stats())
        return response

    async def Reset(
        self, request: scoring_pb2.ResetRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> scoring_pb2.ResetResponse:
        validate(request)
        states, decisions = await self.engine.reset(request.user_id)
        return scoring_pb2.ResetResponse(states_cleared=states, decisions_cleared=decisions)

    async def _generation_inputs(
        self, request: scoring_pb2.GenerateRequest | scoring_pb2.GenerateStreamRequest
    ) -> tuple[str, Assembled]:
        validate(request)
        version = self.generator.resolve_version(request.user_id, request.prompt_version)
        features = await self.engine.assemble(
            request.user_id, inputs_of(request.context, request.profile_features)
        )
        return version, features

    async def _record(self, user_id: str, g: Generation, now: float) -> None:
        await self.engine.record_generation(
            GenerationRecord(g.generation_id, user_id, g.prompt_version, g.model, g.fallback, now)
        )

    async def Generate(
        self,
        request: scoring_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> scoring_pb2.GenerateResponse:
        version, features = await self._generation_inputs(request)
        generation = await self.generator.generate(request.user_id, features, version)
        await self._record(request.user_id, generation, features.now)
        return generate_response(generation)

    async def GenerateStream(
        self,
        request: scoring_pb2.GenerateStreamRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[scoring_pb2.GenerateStreamResponse]:
        version, features = await self._generation_inputs(request)
        # aclosing: a client that goes away frees the model slot at once.
        stream = self.generator.stream(request.user_id, features, version)
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                if isinstance(item, str):
                    yield scoring_pb2.GenerateStreamResponse(delta=item)
                else:
                    await self._record(request.user_id, item, features.now)
                    yield scoring_pb2.GenerateStreamResponse(result=generate_response(item))

"""Replicas on one JetStream (OO_STATE=nats): `oo-ml serve` processes sharing a single
nats-server, and a three-node cluster with every bucket and stream at three replicas."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from oo.scoring.v1 import scoring_pb2 as pb
from tests import natscluster
from tests.conftest import oo_ml_bin
from tests.helpers import assert_eventually
from tests.natscluster import Replica, Topology, single_node, three_nodes
from tests.natsfix import feedback, viewed

# Greedy on its model, no exploration: a Score's scores are the model's, so a replica's
# answer shows which model it used.
GREEDY = {"OO_POLICY": "egreedy-v2", "OO_EPSILON": "0", "OO_MIN_EXPLORATION": "0"}
CANDIDATES = [pb.Candidate(tip_id=t) for t in ("walk", "read", "call")]


@pytest.fixture(params=["single", "cluster"])
async def topology(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Topology]:
    opened = single_node if request.param == "single" else three_nodes
    async with opened(tmp_path / "nats") as t:
        yield t


async def start_replicas(topology: Topology, root: Path, n: int, **env: str) -> list[Replica]:
    return await natscluster.start_replicas(oo_ml_bin(), topology, root, n, **GREEDY, **env)


def scores(resp: pb.ScoreResponse) -> dict[str, float]:
    return {c.tip_id: c.score for c in resp.ranking}


async def test_a_reward_through_one_replica_reaches_the_others(
    topology: Topology, tmp_path: Path
) -> None:
    a, b, c = await start_replicas(topology, tmp_path, 3)
    try:
        req = pb.ScoreRequest(user_id="ana", candidates=CANDIDATES)
        first = await a.stub.Score(req)
        before_b = await b.stub.Score(req)  # B caches ana's model (untaught)
        assert scores(before_b) == scores(first)
        # A's decision, rewarded through C: C finds a decision it never saw.
        done = await c.stub.Reward(pb.RewardRequest(decision_id=first.decision_id, reward=1.0))
        assert done.applied
        taught = scores(await c.stub.Score(req))
        assert taught != scores(first)
        # B's cached model follows within a second (the KV watch), without a restart.
        t0 = time.monotonic()
        while scores(await b.stub.Score(req)) != taught:
            assert time.monotonic() - t0 < 1.0, "B still scores with the old model"
            await asyncio.sleep(0.02)
        stats = await b.stub.Stats(pb.StatsRequest(user_id="ana"))
        assert sum(arm.rewarded for arm in stats.arms) == 1
        # And A cannot reward it again.
        again = await a.stub.Reward(pb.RewardRequest(decision_id=first.decision_id, reward=0.0))
        assert not again.applied
    finally:
        for r in (a, b, c):
            await r.close()


async def test_500_concurrent_rewards_for_one_user_lose_none(
    topology: Topology, tmp_path: Path
) -> None:
    replicas = await start_replicas(topology, tmp_path, 3)
    try:
        req = pb.ScoreRequest(user_id="bo", candidates=CANDIDATES)
        turn = itertools.cycle(range(len(replicas)))
        made = [next(turn) for _ in range(500)]
        decisions = await asyncio.gather(*(replicas[i].stub.Score(req) for i in made))
        # Each reward goes to another replica than the one that decided, all at once.
        results = await asyncio.gather(
            *(
                replicas[(i + 1) % len(replicas)].stub.Reward(
                    pb.RewardRequest(decision_id=d.decision_id, reward=1.0)
                )
                for i, d in zip(made, decisions, strict=True)
            )
        )
        assert all(r.applied for r in results)
        for r in replicas:  # every replica's view of bo's model counts all 500

            async def counted(r: Replica = r) -> None:
                stats = await r.stub.Stats(pb.StatsRequest(user_id="bo"))
                assert sum(arm.rewarded for arm in stats.arms) == 500
                assert stats.pending == 0

            # Each replica's Stats reads its cached model, which learns of the other
            # replicas' rewards through the store's watch: within a second, not at once.
            await assert_eventually(counted, within=1.0)
    finally:
        for r in replicas:
            await r.close()


async def test_each_ingested_event_is_applied_once_across_replicas(
    topology: Topology, tmp_path: Path
) -> None:
    """Two replicas with ingest on share the durable consumers and the profile store:
    feedback published once (and some of it twice, as a retrying producer does) rewards
    each decision once, whichever replica fetched it; views count once in the shared
    profile that both replicas' Score reads."""
    a, b = await start_replicas(topology, tmp_path, 2, OO_INGEST="1")
    publisher = await nats.connect(servers=topology.url.split(","))
    try:
        req = pb.ScoreRequest(user_id="cy", candidates=CANDIDATES)
        decisions = [await (a if i % 2 else b).stub.Score(req) for i in range(60)]
        js = publisher.jetstream()
        events = [
            feedback(f"fb-{i}", d.decision_id, user_id="cy") for i, d in enumerate(decisions)
        ] + [viewed(f"v-{i}", 1000, user_id="cy") for i in range(40)]
        for e in events + events[::5]:  # every fifth event published a second time
            subject = "feedback.tip" if e.HasField("tip_feedback") else "signals.tip.viewed"
            await js.publish(subject, e.SerializeToString())

        async def settled() -> None:
            counts = [(await r.stub.Stats(pb.StatsRequest())).ingest for r in (a, b)]
            applied = sum(c["applied"] for c in counts)
            duplicates = sum(c["duplicates"] for c in counts)
            # 100 published events and the 60 TipServed the replicas published themselves.
            assert (applied, duplicates) == (160, 20), counts
            assert all(c["applied"] > 0 for c in counts), "one replica did all the work"

        await assert_eventually(settled, 30)
        for r in (a, b):

            async def learned(r: Replica = r) -> None:
                stats = await r.stub.Stats(pb.StatsRequest(user_id="cy"))
                assert sum(arm.rewarded for arm in stats.arms) == 60
                dwell = {f.name: f.value for f in stats.features}["mean_dwell_ms_30d"]
                assert dwell == 1000.0

            # Cached models and features catch up with the other replica's writes
            # through the store's watch: within a second, not at once.
            await assert_eventually(learned, within=1.0)
    finally:
        await publisher.close()
        for r in (a, b):
            await r.close()

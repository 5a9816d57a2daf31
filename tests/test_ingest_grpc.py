"""The whole server with ingest on, seen from outside: gRPC in, NATS events in, gRPC out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oo.events.v1 import signals_pb2
from oo.scoring.v1 import scoring_pb2 as pb
from oo_ml.ingest.nats_server import LocalNatsServer
from tests.conftest import ServerFactory
from tests.helpers import assert_eventually
from tests.natsfix import COMPLETED, envelope, feedback, running_nats

ARMS = ["focus", "break"]


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[LocalNatsServer]:
    async with running_nats(tmp_path / "nats") as server:
        yield server


def due(seconds_from_now: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return ts


async def test_events_reach_score_stats_and_health_over_grpc(
    server_factory: ServerFactory, nats_server: LocalNatsServer
) -> None:
    srv = await server_factory({"OO_INGEST": "1", "OO_NATS_URL": nats_server.url})
    health = health_pb2_grpc.HealthStub(srv.channel)

    async def ingest_serving() -> None:
        resp = await health.Check(health_pb2.HealthCheckRequest(service="oo.ingest"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    await assert_eventually(ingest_serving)
    request = pb.ScoreRequest(
        user_id="u1", candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in ARMS]
    )
    decision = (await srv.stub.Score(request)).decision_id
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.publish("feedback.tip", feedback("fb-1", decision, COMPLETED).SerializeToString())
        tasks = signals_pb2.TaskSynced(
            provider="todoist",
            tasks=[
                signals_pb2.Task(id="a", title="Pay rent", due_time=due(-3600)),
                signals_pb2.Task(id="b", title="Plan sprint", due_time=due(86400)),
                signals_pb2.Task(id="c", title="Done already", completed=True),
            ],
        )
        await js.publish(
            "signals.tasks.synced", envelope("tasks-1", task_synced=tasks).SerializeToString()
        )
    finally:
        await nc.close()

    async def applied() -> pb.StatsResponse:
        stats = await srv.stub.Stats(pb.StatsRequest(user_id="u1"))
        assert stats.rewarded == 1
        assert not stats.ingest  # a user's answer carries no server-wide counters
        server = await srv.stub.Stats(pb.StatsRequest())
        # The serve signal we published comes back too: 1 served + 1 feedback + 1 task sync.
        assert server.ingest["applied"] >= 3 and server.ingest["published"] == 1
        return stats

    await assert_eventually(applied)
    resp = await srv.stub.Score(request)
    used = {f.name: f for f in resp.features}
    assert (used["open_tasks"].value, used["overdue_tasks"].value) == (2, 1)
    assert used["open_tasks"].origin == pb.FEATURE_ORIGIN_TASK_STORE
    assert used["completion_rate_30d"].value == 1.0
    assert used["completion_rate_30d"].origin == pb.FEATURE_ORIGIN_PROFILE_STORE
    # A request value still wins over the store.
    request.context.open_tasks = 7
    resp = await srv.stub.Score(request)
    assert (
        next(f for f in resp.features if f.name == "open_tasks").origin == pb.FEATURE_ORIGIN_REQUEST
    )

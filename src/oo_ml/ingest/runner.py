"""`Ingest`: the JetStream ingest's lifecycle, connection and health, as the supervisor sees it.

    ingest = Ingest(config, profiles, health)    # profiles: the ProfileStore port
    engine = ScoringEngine(..., features=profiles)
    ingest.attach(engine)             # rewards go to the engine; decisions come back as signals
    await ingest.start()              # before the gRPC server starts
    ...
    await ingest.stop()               # after the gRPC server drained, before the store closes

NATS: OO_NATS_URL, or else a nats-server child with JetStream on a free loopback port,
its store under <data dir>/nats (restarted if it dies, stopped last). The client
reconnects forever by itself. `start()` waits a few seconds for the first connection and
setup: a stream that cannot serve fails start-up with `IncompatibleStream`; a server that
is not reachable yet does not, and ingest starts when it is. OO_NATS_CREDS_FILE and
OO_NATS_TLS_* give the connection its credentials and TLS (`connection_options`); a TLS or
authorization failure is logged at each attempt, like an unreachable server.

Health entry `oo.ingest`: SERVING while connected with both consumers fetching,
NOT_SERVING otherwise. Score never waits on NATS: features come from SQLite and serve
signals go through a bounded queue.

Stop: stop fetching, finish and settle the batches in hand, publish what is queued (for a
few seconds), drain the connection (which flushes the acks), then stop the local server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from grpc_health.v1 import health_pb2
from nats.aio.client import Client
from nats.js import JetStreamContext

from oo_ml.config import Config, IngestConfig
from oo_ml.domain.engine import DecisionListener, RewardResult
from oo_ml.domain.ports import ProfileStore
from oo_ml.errors import IncompatibleStream
from oo_ml.ingest.consumer import BatchConsumer
from oo_ml.ingest.counters import IngestCounters
from oo_ml.ingest.dead_letters import DeadLetters
from oo_ml.ingest.effects import Applier
from oo_ml.ingest.nats_server import LOCAL_NATS_DIR, LocalNatsServer
from oo_ml.ingest.publisher import ServePublisher
from oo_ml.ingest.streams import CONSUMERS, DLQ, Topology, ensure_topology

log = logging.getLogger(__name__)

HEALTH_SERVICE = "oo.ingest"


class Engine(Protocol):
    """What ingest needs of the scoring engine."""

    listeners: list[DecisionListener]

    async def reward(self, decision_id: str, reward: float) -> RewardResult: ...


@dataclass(frozen=True, slots=True)
class IngestTuning:
    """Timings that are not operator settings; tests shorten them."""

    fetch_timeout_s: float = 1.0
    """Longest wait of one fetch: bounds how long stop() waits for the fetch loops."""
    nak_delay_s: float = 1.0
    """Delay of the first redelivery after a transient failure; doubles per delivery."""
    max_nak_delay_s: float = 60.0
    """Cap of that delay (the server adds the consumer's backoff to it; see `streams`)."""
    reconnect_wait_s: int = 1
    """Pause between reconnect attempts while NATS is away."""
    connect_wait_s: float = 5.0
    """How long start() waits for the first connection before going on without it."""
    publish_queue: int = 10_000
    """Serve signals waiting to be published; beyond that they are dropped and counted."""
    publish_timeout_s: float = 5.0
    """How long a serve signal may wait for JetStream's ack before it counts as failed."""
    prune_interval_s: float = 600.0
    """How often event ids past the dedupe window and buckets past 30 days are deleted."""
    drain_s: float = 5.0
    """At stop, how long queued serve signals may take to be published."""


def connection_options(settings: IngestConfig) -> dict[str, Any]:
    """Credentials and TLS of the NATS connection (OO_NATS_CREDS_FILE, OO_NATS_TLS_*).

    A CA file or a client certificate turns TLS on: the server's certificate is checked
    against the CA file (else the system's CAs) and the URL's host name."""
    options: dict[str, Any] = {}
    if settings.nats_creds_file is not None:
        options["user_credentials"] = str(settings.nats_creds_file)
    if settings.nats_tls:
        ca = settings.nats_tls_ca_file
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        if settings.nats_tls_cert_file is not None and settings.nats_tls_key_file is not None:
            context.load_cert_chain(settings.nats_tls_cert_file, settings.nats_tls_key_file)
        options["tls"] = context
    return options


def server_list(url: str) -> list[str]:
    """OO_NATS_URL's servers: one URL, or several separated by commas (a cluster's
    nodes, so the client can fail over when the one it uses goes away)."""
    return [u.strip() for u in url.split(",") if u.strip()]


class Ingest:
    def __init__(
        self,
        config: Config,
        profiles: ProfileStore,
        health: Any = None,
        *,
        tuning: IngestTuning | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.settings = config.ingest
        self.health = health
        self.tuning = tuning or IngestTuning()
        self.clock = clock
        self.counters = IngestCounters()
        self.profiles = profiles
        self.publisher = ServePublisher(
            self.counters, self.tuning.publish_queue, self.tuning.publish_timeout_s
        )
        self.url: str | None = None
        self.local_server: LocalNatsServer | None = None
        self.topology: Topology | None = None
        self._engine: Engine | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._dead_letters: DeadLetters | None = None
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._side: set[asyncio.Task[None]] = set()
        self._setup_lock = asyncio.Lock()
        self._connected_event = asyncio.Event()
        self._fetching: dict[str, bool] = {c.durable: False for c in CONSUMERS}
        self._health_shown: bool | None = None
        self._last_error_log: dict[str, float] = {}
        self._started = False
        self._stopped = False

    # -- wiring -----------------------------------------------------------------------------

    def feature_store(self) -> ProfileStore:
        return self.profiles

    def task_source(self) -> ProfileStore:
        return self.profiles

    def attach(self, engine: Engine) -> None:
        """Rewards go to engine; its decisions are published as TipServed."""
        self._engine = engine
        engine.listeners.append(self.publisher)

    @property
    def serving(self) -> bool:
        return (
            self._connected_event.is_set() and self._ready.is_set() and all(self._fetching.values())
        )

    def stats(self) -> dict[str, int]:
        return self.counters.as_dict()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._engine is None:
            raise RuntimeError("Ingest.attach(engine) must come before start()")
        await self.profiles.ensure_schema()
        await self.profiles.prune(self.clock())
        await self._show_health(force=True)
        url = self.settings.nats_url
        if url is None:
            self.local_server = LocalNatsServer(self.config.server.data_dir / LOCAL_NATS_DIR)
            url = await self.local_server.start()
            log.info(
                "started a local nats-server with JetStream at %s (store %s)",
                url,
                self.local_server.store_dir,
            )
        self.url = url
        self._main = asyncio.create_task(self._run(url), name="oo-ingest")
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait(
            {ready, self._main},
            timeout=self.tuning.connect_wait_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        ready.cancel()
        if self._main.done() and not self._main.cancelled() and self._main.exception():
            error = self._main.exception()
            await self.stop()
            assert error is not None
            raise error
        self._started = True
        if not self._ready.is_set():
            log.warning(
                "NATS at %s is not reachable yet: ingest starts when it is; Score is unaffected",
                url,
            )

    async def wait(self) -> None:
        """Until the ingest has stopped (its loops restart themselves after a failure)."""
        if self._main is not None:
            await self._main
        while not self._stop.is_set() or any(not t.done() for t in self._tasks):
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if not self._stop.is_set():
                await self._stop.wait()

    async def stop(self) -> None:
        """Idempotent. Settles what is in flight; the caller closes the store afterwards."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        await self._show_health(force=True)
        if self._main is not None and not self._ready.is_set():
            self._main.cancel()  # still connecting: nothing is in flight
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._main is not None:
            await asyncio.gather(self._main, return_exceptions=True)
        if self._dead_letters is not None:
            await self._quietly("closing the advisory subscriptions", self._dead_letters.close())
        if self._nc is not None and not self._nc.is_closed:
            if self._nc.is_connected:
                await self._quietly("draining the NATS connection", self._nc.drain())
            else:
                await self._quietly("closing the NATS connection", self._nc.close())
        for task in list(self._side):
            task.cancel()
        if self.local_server is not None:
            await self.local_server.stop()
        log.info("ingest stopped: %s", self.counters.as_dict())

    async def _quietly(self, what: str, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception as e:  # shutting down: report, then carry on with the next step
            log.warning("%s failed: %s", what, e)

    # -- the connection -----------------------------------------------------------------------

    async def _run(self, url: str) -> None:
        # Our own Client object, so stop() can close it even while it is still connecting.
        self._nc = nc = Client()
        await nc.connect(
            servers=server_list(url),
            **connection_options(self.settings),
            name="oo-ml-ingest",
            max_reconnect_attempts=-1,
            reconnect_time_wait=self.tuning.reconnect_wait_s,
            connect_timeout=2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
        )
        self._js = js = nc.jetstream()
        self._connected_event.set()
        log.info("connected to NATS at %s", url)
        topology = await self._first_setup()
        if topology is None:
            return
        assert self._engine is not None
        dead_letters = DeadLetters(nc, js, self.counters, topology.stream_of(DLQ))
        self._dead_letters = dead_letters
        applier = Applier(self.profiles, self._engine, self.settings, self.counters, self.clock)
        for spec in CONSUMERS:
            stream = topology.stream_of(spec.stream)
            await dead_letters.watch(stream, spec.durable, self._count_error)
            consumer = BatchConsumer(
                js=js,
                stream=stream,
                durable=spec.durable,
                batch=self.settings.batch,
                applier=applier,
                dead_letters=dead_letters,
                counters=self.counters,
                fetch_timeout_s=self.tuning.fetch_timeout_s,
                nak_delay_s=self.tuning.nak_delay_s,
                max_nak_delay_s=self.tuning.max_nak_delay_s,
                on_state=functools.partial(self._on_fetch_state, spec.durable),
                on_lost=self._resetup,
            )
            # Consuming from now on; a failing fetch turns it off until one succeeds.
            self._fetching[spec.durable] = True
            self._spawn_supervised(f"consumer {spec.durable}", consumer.run)
        self._spawn_supervised(
            "serve publisher",
            lambda stop: self.publisher.run(
                nc, js, stop, self._connected_event, self.tuning.drain_s
            ),
        )
        self._spawn_supervised("pruner", self._prune_loop)
        if self.local_server is not None:
            self._spawn_supervised("nats-server watchdog", self._watch_local_server)
        self._ready.set()
        await self._show_health()

    async def _first_setup(self) -> Topology | None:
        """The topology; None if stop() came first. While start() waits, a failure fails
        start-up with its reason. Once start() has returned (setup outlasted
        `connect_wait_s`, and the server is serving Score), a failure must not end the
        process: an incompatible stream is checked again every 30 s, anything else (a
        slow or electing cluster's API timeouts) after a pause that doubles up to 30 s."""
        pause = 1.0
        while not self._stop.is_set():
            try:
                return await self._setup()
            except IncompatibleStream as e:
                if not self._started:
                    raise  # start() is waiting: fail start-up with the reason
                self._count_error()
                log.error("ingest cannot start: %s (checking again in 30 s)", e)
                wait = 30.0
            except Exception as e:
                if not self._started:
                    raise
                self._count_error()
                log.warning("ingest setup failed: %s (trying again in %.0f s)", e, pause)
                wait, pause = pause, min(2 * pause, 30.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=wait)
        return None

    async def _setup(self) -> Topology:
        async with self._setup_lock:
            assert self._js is not None
            self.topology = await ensure_topology(self._js, self.settings)
            return self.topology

    async def _resetup(self) -> None:
        """After a reconnect or a lost consumer: make sure streams and consumers exist."""
        try:
            await self._setup()
        except IncompatibleStream as e:
            self._count_error()
            log.error("ingest cannot resume: %s", e)
        except Exception as e:  # not reachable again: the next reconnect retries
            log.warning("stream setup after reconnect failed: %s", e)

    def _spawn_supervised(
        self, name: str, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
    ) -> None:
        async def supervised() -> None:
            while not self._stop.is_set():
                try:
                    await run(self._stop)
                    return
                except Exception:
                    self._count_error()
                    log.exception("ingest %s failed; restarting it in 1 s", name)
                    await self._show_health()
                    await asyncio.sleep(1.0)

        self._tasks.append(asyncio.create_task(supervised(), name=f"oo-ingest {name}"))

    # -- connection callbacks -----------------------------------------------------------

    async def _on_error(self, e: Exception) -> None:
        # While NATS is away this fires at every reconnect attempt: log each kind twice a minute.
        key = type(e).__name__
        now = time.monotonic()
        if now - self._last_error_log.get(key, -1e9) >= 30.0:
            self._last_error_log[key] = now
            log.warning("NATS connection error (%s): %s", key, e)

    async def _on_disconnected(self) -> None:
        if self._connected_event.is_set() and not self._stop.is_set():
            log.warning("lost the NATS connection to %s; reconnecting", self.url)
        self._connected_event.clear()
        await self._show_health()

    async def _on_reconnected(self) -> None:
        self._connected_event.set()
        log.info("reconnected to NATS at %s", self.url)
        if self._ready.is_set() and not self._stop.is_set():
            self._background(self._resetup())
        await self._show_health()

    async def _on_closed(self) -> None:
        self._connected_event.clear()
        await self._show_health()

    def _on_fetch_state(self, durable: str, ok: bool) -> None:
        if self._fetching.get(durable) != ok:
            self._fetching[durable] = ok
            self._background(self._show_health())

    def _count_error(self) -> None:
        self.counters.errors += 1

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    # -- health ---------------------------------------------------------------------------

    async def _show_health(self, force: bool = False) -> None:
        serving = self.serving and not self._stop.is_set()
        if self.health is None or (serving == self._health_shown and not force):
            return
        self._health_shown = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        result = self.health.set(HEALTH_SERVICE, status)
        # grpc_health has a sync servicer and an asyncio one; accept either.
        if inspect.isawaitable(result):
            await result

    # -- background loops -------------------------------------------------------------------

    async def _prune_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.tuning.prune_interval_s)
                return
            except TimeoutError:
                pass
            try:
                forgotten = await self.profiles.prune(self.clock())
                log.debug("pruned %d applied event ids", forgotten)
            except Exception:
                self._count_error()
                log.exception("pruning the ingest tables failed; trying again later")

    async def _watch_local_server(self, stop: asyncio.Event) -> None:
        server = self.local_server
        assert server is not None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
                return
            except TimeoutError:
                pass
            if not server.running():
                code = server.proc.returncode if server.proc else None
                log.error("the local nats-server exited (%s); starting it again", code)
                self._count_error()
                await server.start()

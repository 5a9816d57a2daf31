"""The supervisor: builds the stores, the engine, the gRPC server and the ingest, runs them
under one `asyncio.TaskGroup`, and stops them.

Start: open the SQLite store, build the engine, start ingest (when enabled), bind the
gRPC server with health and reflection, then run the upkeep jobs. `serve` supervises the
server, the ingest and the upkeep in one TaskGroup: if one of them dies, the others are
cancelled and the process stops instead of serving half-alive.

Stop (SIGTERM/SIGINT, or `stop()`): health goes NOT_SERVING so balancers stop sending,
`server.stop(grace)` lets in-flight calls finish, the upkeep and the shadow tasks end,
ingest stops fetching and drains, the generator's HTTP clients close, and the store
finishes its queued commits before it closes. Each step runs even if an earlier one
raised (the failures are logged and the first is re-raised at the end), and a second
`stop()` does nothing. Nothing acknowledged is lost: an answer is only sent after its
commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client

from oo.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from oo_ml.app.exposure import exposure_problem
from oo_ml.app.metrics import Metrics, MetricsEndpoint
from oo_ml.app.tls import CertificateFiles, server_credentials
from oo_ml.config import Config
from oo_ml.domain.engine import ScoringEngine
from oo_ml.domain.features import FeatureStore, NoStoredFeatures, NoTasks, TaskSource
from oo_ml.domain.ports import Change, ChangeFeed, ProfileStore
from oo_ml.edge.interceptors import SERVICE, EdgeGuard
from oo_ml.edge.service import ScoringService
from oo_ml.generate.generator import Generator
from oo_ml.generate.prompts import check_config
from oo_ml.ingest.runner import Ingest, connection_options, server_list
from oo_ml.schema.contracts import ALL_FEATURES, MAX_CANDIDATES
from oo_ml.stores.nats.profiles import NatsProfileStore
from oo_ml.stores.nats.scoring import NatsStore
from oo_ml.stores.sqlite.changes import PRUNE_EVERY_S, SqliteChangeFeed
from oo_ml.stores.sqlite.profiles import SqliteProfileStore
from oo_ml.stores.sqlite.scoring import SqliteStore

log = logging.getLogger(__name__)

DB_FILE = "oo-ml.db"
# Reflection answers from the default descriptor pool: importing the error detail types
# puts them there, so grpcurl can resolve google.rpc.BadRequest and print its violations.
ERROR_DETAILS_FILE = error_details_pb2.DESCRIPTOR.name
# Health entry of the engine's background jobs (NOT_SERVING while one keeps failing).
UPKEEP_HEALTH = "oo.upkeep"
_UPKEEP_HEALTH_EVERY_S = 1.0


@dataclass
class App:
    config: Config
    port: int = 0
    worker: int | None = None
    """Set in a worker process of `oo-ml serve --workers N` (its index), None otherwise."""
    engine: ScoringEngine | None = None
    store: SqliteStore | NatsStore | None = None
    generator: Generator | None = None
    health: health.aio.HealthServicer = field(default_factory=health.aio.HealthServicer)
    _server: grpc.aio.Server | None = None
    _stop_bg: asyncio.Event = field(default_factory=asyncio.Event)
    _bg: asyncio.Task[None] | None = None
    ingest: Ingest | None = None
    _stopped: bool = False
    metrics: Metrics = field(default_factory=Metrics)
    _metrics_endpoint: MetricsEndpoint | None = None
    tls_files: CertificateFiles | None = None
    # OO_STATE=nats: the store's own connection (ingest keeps its own).
    _state_nc: Client | None = None
    # Change feeds of a shared store, each with what applies its changes (a cache).
    _feeds: list[tuple[ChangeFeed, Callable[[Sequence[Change]], None]]] = field(
        default_factory=list
    )
    # SQLite: the profile store and the change feed that keeps its cache and the models'
    # in step with other processes on the file.
    profiles: SqliteProfileStore | None = None
    feed: SqliteChangeFeed | None = None

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_endpoint.port if self._metrics_endpoint is not None else None

    async def start(self) -> int:
        cfg = self.config
        problem = exposure_problem(cfg.server)
        if problem is not None:
            raise ValueError(problem)
        if cfg.server.insecure:
            log.warning("OO_INSECURE is set: the protected-mode check is off")
        # Read and check the certificate before anything opens: a bad one fails the start.
        tls = server_credentials(cfg.server)
        max_candidates = cfg.scoring.max_candidates or MAX_CANDIDATES
        if cfg.scoring.max_arms < max_candidates:
            raise ValueError(
                f"OO_MAX_ARMS ({cfg.scoring.max_arms}) must be at least the candidate limit"
                f" ({max_candidates}, OO_MAX_CANDIDATES or scoring.proto's max_items)"
            )
        cfg.server.data_dir.mkdir(parents=True, exist_ok=True)
        features: FeatureStore = NoStoredFeatures()
        tasks: TaskSource = NoTasks()
        ingest: Ingest | None = None
        profiles: ProfileStore | None = None
        store: SqliteStore | NatsStore
        if cfg.server.state == "nats":
            nats_store = await self._open_nats_store()
            self.store = store = nats_store
            assert self._state_nc is not None
            # Shared by the replicas: one with ingest off still reads what others ingest.
            nats_profiles = NatsProfileStore(
                self._state_nc,
                cfg.ingest.dedupe_window_s,
                ALL_FEATURES,
                replicas=cfg.server.nats_replicas,
                cache_s=cfg.scoring.feature_cache_s,
            )
            await nats_profiles.ensure_schema()
            self._feeds.append((nats_profiles, nats_profiles.apply))
            features = tasks = nats_profiles
            if cfg.ingest.enabled:
                profiles = nats_profiles
        else:
            sqlite_store = SqliteStore.open(
                cfg.server.data_dir / DB_FILE,
                decision_writer=cfg.scoring.decision_writer,
                recent_decisions_mb=cfg.scoring.decision_cache_mb,
            )
            self.store = store = sqlite_store
            if sqlite_store.writer is not None:
                try:
                    await sqlite_store.writer.check()
                except OSError as e:
                    raise RuntimeError(
                        f"the decision writer process cannot run ({e});"
                        " OO_DECISION_WRITER=thread does without it"
                    ) from e
            if cfg.ingest.enabled:
                profiles = self.profiles = SqliteProfileStore(
                    sqlite_store.db,
                    cfg.ingest.dedupe_window_s,
                    ALL_FEATURES,
                    cache_s=cfg.scoring.feature_cache_s,
                )
        if profiles is not None:
            features = tasks = profiles
            ingest = Ingest(cfg, profiles, self.health)
        shared = cfg.server.workers > 1 or cfg.server.state == "nats"
        self.engine = engine = ScoringEngine(
            cfg.scoring,
            store,
            features,
            ALL_FEATURES,
            join_wait_s=cfg.server.join_wait_ms / 1000 if shared else 0.0,
        )
        if isinstance(store, NatsStore):
            models = engine.models
            feed = store.change_feed(lambda u, p: models.cached(u, p) is not None)
            self._feeds.append((feed, models.apply))
        else:
            # Other processes on the file (workers, `oo-ml migrate`) write models and
            # profiles too: its change sequence keeps this process's caches in step
            # (ADR 0020). Followed even alone on the file: idle, it costs 0.6% of a core.
            self.feed = SqliteChangeFeed(store.db)
            await self.feed.catch_up()  # from here on, before anything can be cached
            engine.upkeep.add_job("changes", PRUNE_EVERY_S, self.feed.prune)
            self.metrics.change_feed(self.feed)
            self._feeds.append((self.feed, self._apply_changes))
        self.generator = generator = self._make_generator(tasks)
        if ingest is not None:
            ingest.attach(engine)
            self.ingest = ingest
            self.metrics.ingest(ingest.stats)

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.server.max_message_bytes),
                ("grpc.max_send_message_length", cfg.server.max_message_bytes),
                # Alone, fail loudly if the port is taken instead of sharing it silently;
                # as one of N workers, share it with the others (the parent checked that
                # it was free before starting them: `app/workers.py`).
                ("grpc.so_reuseport", 1 if self.worker is not None else 0),
            ],
        )
        guard = EdgeGuard(cfg.server.auth_token, cfg.server.admin_token, self.metrics)
        guard.register(
            server,
            scoring_pb2_grpc.add_ScoringServiceServicer_to_server,
            ScoringService(
                engine,
                generator,
                max_candidates,
                ingest_stats=ingest.stats if ingest is not None else dict,
                server_id=f"{socket.gethostname()}/{os.getpid()}",
            ),
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        guard.register_reflection(
            server,
            (
                scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            public=cfg.server.reflection == "public",
        )
        address = f"{cfg.server.host}:{cfg.server.port}"
        if tls is None:
            self.port = server.add_insecure_port(address)
        else:
            creds, self.tls_files = tls
            self.port = server.add_secure_port(address, creds)
        if self.port == 0:
            raise OSError(f"cannot bind {cfg.server.host}:{cfg.server.port}")
        self.metrics.engine(engine)
        if cfg.server.metrics_port is not None:
            # A worker's own endpoint is private, on a loopback port of its own: the
            # parent serves OO_METRICS_PORT with every worker's series (app/workers.py).
            host, port = (
                (cfg.server.host, cfg.server.metrics_port)
                if self.worker is None
                else ("127.0.0.1", 0)
            )
            self._metrics_endpoint = MetricsEndpoint(self.metrics, host, port)
            await self._metrics_endpoint.start()
        if self.ingest is not None:
            await self.ingest.start()
        await server.start()
        self._server = server
        for name in ("", SERVICE, UPKEEP_HEALTH):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._bg = asyncio.create_task(self._run_upkeep(), name="oo-upkeep")
        mode = "plaintext"
        if cfg.server.tls:
            mode = "mTLS" if cfg.server.tls_client_ca_file is not None else "TLS"
        log.info(
            "oo-ml listening on %s:%d (%s)%s",
            cfg.server.host,
            self.port,
            mode,
            "" if self.worker is None else f", worker {self.worker} (pid {os.getpid()})",
        )
        return self.port

    async def _run_upkeep(self) -> None:
        """The engine's jobs, and their health entry kept in step with them."""
        assert self.engine is not None
        upkeep = self.engine.upkeep

        async def show_health() -> None:
            shown: bool | None = None
            while not self._stop_bg.is_set():
                if upkeep.healthy != shown:
                    shown = upkeep.healthy
                    status = health_pb2.HealthCheckResponse
                    await self.health.set(
                        UPKEEP_HEALTH, status.SERVING if shown else status.NOT_SERVING
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_bg.wait(), _UPKEEP_HEALTH_EVERY_S)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(upkeep.run(self._stop_bg))
            tg.create_task(show_health())
            for feed, apply in self._feeds:
                tg.create_task(feed.follow(apply, self._stop_bg))

    async def _open_nats_store(self) -> NatsStore:
        """Connect to OO_NATS_URL (reconnecting forever) and open the JetStream store."""
        cfg = self.config
        assert cfg.ingest.nats_url is not None  # the config checks it
        nc = Client()
        self._state_nc = nc
        opened: list[NatsStore] = []

        async def reconnected() -> None:
            for store in opened:  # decisions another replica buffered may land late
                store.reconnected_at = time.monotonic()

        await nc.connect(
            reconnected_cb=reconnected,
            servers=server_list(cfg.ingest.nats_url),
            **connection_options(cfg.ingest),
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=2,
            name="oo-ml-state",
        )
        store = await NatsStore.open(
            nc,
            replicas=cfg.server.nats_replicas,
            retention_s=cfg.scoring.decision_retention_s,
            log_max_mb=cfg.scoring.decision_log_max_mb,
        )
        opened.append(store)
        return store

    def _apply_changes(self, changes: Sequence[Change]) -> None:
        """What other processes wrote: cached models and profile features that are older go."""
        assert self.engine is not None
        self.engine.models.apply(changes)
        if self.profiles is not None:
            self.profiles.apply(changes)

    def _make_generator(self, tasks: TaskSource) -> Generator:
        check_config(self.config.llm)  # an unknown DEFAULT_PROMPT_VERSION fails at start
        generator = Generator(self.config.llm, tasks)
        # Imports LiteLLM on a thread when a model is configured, so the first Generate
        # does not pay for it and Score never does.
        generator.warm()
        return generator

    async def wait(self) -> None:
        """Until the server or the upkeep ends by itself (a failure): what `serve`
        supervises beside the stop signal."""
        waits: list[Awaitable[object]] = []
        if self._server is not None:
            waits.append(self._server.wait_for_termination())
        if self._bg is not None:
            waits.append(self._bg)
        if self.ingest is not None:
            waits.append(self.ingest.wait())
        async with asyncio.TaskGroup() as tg:
            for w in waits:
                tg.create_task(_await(w))

    async def stop(self) -> None:
        """Stop everything, in order; every step runs even if an earlier one failed."""
        if self._stopped:
            return
        self._stopped = True
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("health", self.health.enter_graceful_shutdown),
        ]
        if self._server is not None:
            server = self._server
            steps.append(("gRPC server", lambda: server.stop(self.config.server.grace_s)))
        steps.append(("upkeep", self._stop_upkeep))
        if self.engine is not None:
            # Shadows drained and the decision log's buffer committed, before the store goes.
            steps.append(("decision log", self.engine.close))
        if self.ingest is not None:
            steps.append(("ingest", self.ingest.stop))
        if self.generator is not None:
            steps.append(("generator", self.generator.aclose))
        if self.store is not None:
            steps.append(("store", self.store.close))
        if self._state_nc is not None:
            nc = self._state_nc
            steps.append(("store's NATS connection", nc.close))
        if self._metrics_endpoint is not None:
            steps.append(("metrics endpoint", self._metrics_endpoint.stop))
        first: BaseException | None = None
        for name, step in steps:
            try:
                await step()
            except Exception as e:
                log.error("stopping the %s failed: %s", name, e, exc_info=e)
                first = first or e
        log.info("oo-ml stopped")
        if first is not None:
            raise first

    async def _stop_upkeep(self) -> None:
        self._stop_bg.set()
        if self._bg is not None:
            await self._bg


async def _await(w: Awaitable[object]) -> None:
    await w


FULL_COLLECTION_EVERY = 1000
"""Generation-1 collections of CPython's cyclic collector between two full ones (its
default: 10). A full collection walks every tracked object, and a server's caches hold
hundreds of thousands: with 10,000 users' models, 84 ms each, every few seconds under load,
freeing a few hundred objects each time (ADR 0031)."""


def tune_collector() -> tuple[int, int, int]:
    """Make full collections rare in this process; the thresholds now in force."""
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, FULL_COLLECTION_EVERY)
    return gc.get_threshold()


async def serve(config: Config, worker: int | None = None) -> None:
    """Run until SIGTERM or SIGINT (or until a supervised part fails), then stop.

    `worker`: this process is worker `worker` of `oo-ml serve --workers N`; it shares the
    port, reports its metrics port to the parent, and stops when the parent is gone."""
    log.info("cyclic collector thresholds %s (ADR 0031)", tune_collector())
    app = App(config, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    orphaned: asyncio.Task[None] | None = None
    if worker is not None:
        orphaned = asyncio.create_task(_until_orphaned(stop))
    try:
        port = await app.start()
        if worker is not None and app.metrics_port is not None:
            print(f"oo-ml worker metrics on 127.0.0.1:{app.metrics_port}", flush=True)
        # One line on stdout that scripts, tests and the workers' parent wait for.
        print(f"oo-ml listening on {config.server.host}:{port}", flush=True)
        signalled = asyncio.create_task(stop.wait())
        running = asyncio.create_task(app.wait())
        done, _ = await asyncio.wait({signalled, running}, return_when=asyncio.FIRST_COMPLETED)
        if signalled in done:
            log.info("signal received: draining")
        else:
            signalled.cancel()
            log.error(
                "a supervised part of the server stopped: %s; shutting down", running.exception()
            )
        # Not cancelled: stop() ends each part, and with it the wait (cancelling grpc's
        # wait_for_termination would cancel the server's own shutdown).
        await app.stop()
        await asyncio.gather(running, return_exceptions=True)
    finally:
        if orphaned is not None:
            orphaned.cancel()
        try:
            await app.stop()
        except Exception:
            log.exception("shutdown did not complete cleanly")


async def _until_orphaned(stop: asyncio.Event, every_s: float = 1.0) -> None:
    """Set `stop` when the parent is gone (killed with -9, say), so a worker never goes
    on serving the port with nobody to stop it: the kernel re-parents an orphan."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(every_s)
        if os.getppid() != parent:
            log.error("the workers' parent (pid %d) is gone: stopping", parent)
            stop.set()

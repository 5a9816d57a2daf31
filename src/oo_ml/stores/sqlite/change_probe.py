"""The change feed's probe: a child process that watches the head of a SQLite file's change
sequence (`changes`) and tells its parent, by one byte on a pipe, when another writer
added to it.

It was a thread of the server (ADR 0020). A thread's every poll takes the GIL from the
busy event loop about three times (after its sleep, and around each SQLite step), and each
time the loop waits for the interpreter's switch interval and hands over: under Score
load the probe cost the server 5-8 % of its QPS (two alternating pairs, ADR 0029). A process has its own interpreter, and the loop hears from it only when there
is something to read. It also skips the parent's own rows (`origin`): under Reward load
the parent's own writes, which its caches took by write-through, moved the head at every
poll and woke the loop for nothing.

The child is this module run as a script, with no oo_ml import, so it starts in a few tens
of milliseconds. Its arguments: the file, the poll interval in seconds, the parent's
origin, and the highest seq the parent has read. It writes b"c" when rows of another
origin arrived, or the prune horizon moved (a follower may have lost rows), and b"e" when
it cannot read the file (the parent's own read reports and retries). It opens the file
read-only (a file deleted meanwhile is not made again, empty). It ends at end of input:
its parent closed the pipe, or died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import sqlite3
import sys
import urllib.parse
from collections.abc import Callable

log = logging.getLogger(__name__)

CHANGED = b"c"
UNREADABLE = b"e"
# After a failed read, the child waits this long before the next (the parent's own reads
# report and back off the same way).
_ERROR_PAUSE_S = 1.0
# A child that ends on its own (killed, out of memory) is started again after this pause,
# doubled while children keep ending within _RESTART_RESET_S of their start (so one that
# cannot run at all is not restarted, and logged, every second); meanwhile the feed's
# periodic full read keeps the caches at most a second behind.
_RESTART_PAUSE_S = 1.0
_RESTART_PAUSE_MAX_S = 30.0
_RESTART_RESET_S = 60.0


def head(conn: sqlite3.Connection) -> tuple[int, int]:
    """(highest seq, pruned-through horizon) of the change sequence."""
    row = conn.execute(
        "SELECT (SELECT max(seq) FROM changes),"
        " (SELECT pruned_through FROM change_horizon WHERE id = 0)"
    ).fetchone()
    return int(row[0] or 0), int(row[1] or 0)


def foreign_since(conn: sqlite3.Connection, after: int, through: int, origin: int) -> bool:
    """Whether a row in (after, through] was written by another origin than `origin`."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM changes WHERE seq > ? AND seq <= ? AND origin != ?)",
        (after, through, origin),
    ).fetchone()
    return bool(row[0])


def main(path: str, poll_s: float, origin: int, after: int) -> int:
    # The parent ends the child by closing the pipe; a signal sent to the whole group
    # (Ctrl-C in a terminal) must not end it first and leave the parent restarting it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    conn: sqlite3.Connection | None = None
    seen = after  # the highest seq looked at
    horizon = 0  # the prune horizon last seen: a prune before the first look wakes too
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    pause = poll_s
    while True:
        # Waiting on the pipe, not sleeping: the parent's close ends the wait at once.
        readable, _, _ = select.select([stdin], [], [], pause)
        if readable and not os.read(stdin, 4096):
            break
        pause = poll_s
        try:
            if conn is None:
                conn = sqlite3.connect(uri, uri=True, isolation_level=None)
                conn.execute("PRAGMA query_only=ON")
                conn.execute("PRAGMA busy_timeout=100")
            top, pruned = head(conn)
            changed = pruned != horizon or (top > seen and foreign_since(conn, seen, top, origin))
        except sqlite3.Error:
            if not _tell(stdout, UNREADABLE):
                break
            pause = _ERROR_PAUSE_S
            continue
        seen, horizon = max(seen, top), pruned
        if changed and not _tell(stdout, CHANGED):
            break
    if conn is not None:
        conn.close()
    return 0


def _tell(stdout: int, what: bytes) -> bool:
    try:
        os.write(stdout, what)
    except BrokenPipeError:  # the parent is gone
        return False
    return True


class ProbeProcess:
    """The parent's end: starts the child, calls `wake` for every byte it writes, and
    starts it again (after `_RESTART_PAUSE_S`, doubling) if it ends on its own."""

    def __init__(
        self,
        path: str,
        poll_s: float,
        origin: int,
        wake: Callable[[], None],
        position: Callable[[], int],
    ) -> None:
        """`position()`: the highest seq the parent has read, where a child starts."""
        self.path = path
        self.poll_s = poll_s
        self.origin = origin
        self.wake = wake
        self.position = position
        self.starts = 0
        """Children started (more than 1: one ended on its own and was replaced)."""
        self.wakes = 0
        """Bytes the children wrote (each a `wake`)."""
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped: asyncio.Event | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        self._stopped = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="oo-change-probe")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = _RESTART_PAUSE_S
        while not self._stopping:
            started = loop.time()
            try:
                ended = await self._child()
            except Exception as e:  # a bug here must not end the probe for the server's life
                log.exception("change probe failed")
                ended = f"failed: {e!r}"
            if self._stopping:
                return
            if loop.time() - started >= _RESTART_RESET_S:
                pause = _RESTART_PAUSE_S
            log.warning("change probe %s; starting another in %g s", ended, pause)
            self.wake()  # whatever happened meanwhile is read now
            await self._pause(pause)
            pause = min(2 * pause, _RESTART_PAUSE_MAX_S)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or until `stop`."""
        assert self._stopped is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _child(self) -> str:
        """Start a child and pass on its bytes until it ends; how it ended."""
        try:
            proc = self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",  # no PYTHONPATH, no user site, no script directory on sys.path
                __file__,
                self.path,
                repr(self.poll_s),
                str(self.origin),
                str(self.position()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            return f"could not start ({e})"
        self.starts += 1
        assert proc.stdin is not None and proc.stdout is not None
        if self._stopping:  # stopped while it started
            proc.stdin.close()
        while True:
            got = await proc.stdout.read(4096)
            if not got:
                break
            self.wakes += len(got)
            self.wake()
        return f"process ended (status {await proc.wait()})"

    async def stop(self) -> None:
        """End the child (end of input) and wait for it."""
        self._stopping = True
        if self._stopped is not None:
            self._stopped.set()  # a pause before a restart ends now
        proc = self._proc
        if proc is not None and proc.returncode is None and proc.stdin is not None:
            proc.stdin.close()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 5)
        except TimeoutError:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))

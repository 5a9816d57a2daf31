"""The decision log's inserts, rewards' writes, and the child process that runs them.

Score answers before its decision is written; the decision log group-commits its buffer
every few milliseconds (ADR 0011). Committed on the store's writer *thread*, each group
commit cost the event loop far more than the commit's own work: the thread takes the GIL
back from the busy loop several times a commit (every SQLite step and zlib release it),
and under load those handoffs cost the loop about 0.1 ms of CPU per Score, a quarter of
its budget. A child process has its own interpreter: the loop serializes the rows, writes
one frame to a pipe and reads one back, and the child compresses the records and runs the
SQL (ADR 0023; figures in bench/results/). The child is this module run as a script, with
no oo_ml import beyond it, so it starts in a few tens of milliseconds.

The pipe carries frames of a 4-byte little-endian length and a pickle, between a parent
and the child it started (never anything else):

- request: a list of steps, committed in one transaction, in order: ("decisions", rows)
  with rows as `insert_decisions` takes them, ("shadows", rows) as `attach_shadows`, or
  ("transactions", txs): Rewards' writes (see below);
- reply: ("ok", results) or ("transient", reason) (the file is busy, full, unwritable: the
  log keeps the batch and retries it) or ("refused", reason) (the batch itself is wrong:
  the log commits it write by write to find the bad one). `results` has one entry per
  transaction of the batch, in order.

Rewards' writes come here too (ADR 0027): on the store's writer thread, each reward's
commit took the GIL back from the busy loop at every SQLite step, as the decision log's
did. A "transactions" step carries many rewards' transactions, each a list of `Write`
tuples (`put_state`, `mark_rewarded`, `off_policy`, the same functions the writer thread
runs for a store without a child), each run in its own savepoint: one whose condition
fails (a compare-and-set lost, a decision rewarded already) is rolled back alone and
answered ("conflict", reason); the others commit together, one fsync for all, and are
answered ("ok", revisions) before any caller hears.

Inserts are idempotent: a decision already in the file is skipped, so a batch retried
after the child died between its commit and its reply lands once. The child ends at end
of input (its parent closed the pipe, or died) after the batch it is committing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import signal
import sqlite3
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

# A decision's row in `decisions`: id, user, policy, created_at, chosen arm, prompt
# version, the serialized record (`codec.serialize_decision`), compressed here on insert.
DecisionRow = tuple[str, str, str, float, str, str, bytes]
# A decision's shadow views: its id and their encoding.
ShadowRow = tuple[str, bytes]
# A reward's writes, as `write` takes them: ("put_state", user_id, policy, revision,
# encoded state, updated_at, change-feed origin), ("mark_rewarded", decision_id, reward,
# at, source), ("off_policy", served, shadow, weight, reward, dr).
Write = tuple[Any, ...]
Step = tuple[str, Sequence[DecisionRow] | Sequence[ShadowRow] | Sequence[Sequence[Write]]]
# A transaction's answer: ("ok", {(user_id, policy): new revision}), ("conflict", reason)
# or ("refused", reason).
TxResult = tuple[str, Any]

FRAME = struct.Struct("<I")

# codec.COMPRESS_LEVEL (this module imports nothing of oo_ml; a test holds them equal).
COMPRESS_LEVEL = 1

# A run of decisions is inserted by multi-row statements of these sizes (largest first):
# each size's statement is prepared once and cached, and a group commit of n decisions
# steps SQLite about log2(n) times instead of twice per decision.
_CHUNKS = (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)

# Rewards' transactions are paced (ADR 0027): while frames of them go out less than
# _TX_PACE_S apart and more than one caller is at it, the next frame waits out the rest
# of that interval or until _TX_GROUP transactions are queued, so that a frame carries
# many. Unpaced, the child answered so fast under load that frames carried 1.6
# transactions on average, and each frame's pickling, pipe and wake-ups on the event loop
# cost more than the writer thread they replaced. A lone caller (each transaction
# waiting for the last) is never paced. Like PostgreSQL's commit_delay with
# commit_siblings, but keyed to what the writer sees.
_TX_PACE_S = 0.002
_TX_GROUP = 16

# How long the child waits for the file's write lock, which the parent's writer thread
# also takes (resets, profiles, generations, upkeep's prunes, a bulk delete of which can
# run for seconds). Rewards queued on the thread used to wait as long as it took; here
# they wait this long before their frame fails as transient (ADR 0027).
BUSY_TIMEOUT_MS = 30_000


@functools.cache
def _multi_row(head: str, row: str, n: int, tail: str = "") -> str:
    return f"{head} VALUES {', '.join([row] * n)}{tail}"


def _chunks(n: int, per_row: int, conn: sqlite3.Connection) -> Iterator[tuple[int, int]]:
    """(start, size) pieces of n rows, in the sizes of `_CHUNKS` that stay within the
    library's limit on bound parameters (999 in SQLite builds before 3.32)."""
    largest = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // per_row
    start = 0
    for size in (s for s in _CHUNKS if s <= largest):
        while n - start >= size:
            yield start, size
            start += size


@functools.cache
def _in_list(n: int) -> str:
    return f"SELECT decision_id FROM decisions WHERE decision_id IN ({', '.join('?' * n)})"


def _present(conn: sqlite3.Connection, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start, size in _chunks(len(ids), 1, conn):
        found.update(r[0] for r in conn.execute(_in_list(size), ids[start : start + size]))
    return found


def insert_decisions(conn: sqlite3.Connection, run: Sequence[DecisionRow]) -> None:
    """The decisions' rows, in a few statements; those already in the file (a retried
    batch) are skipped. A decision is its pull: pulls are counted from the log
    (`decisions_user_arm`, ADR 0030), except in a file not migrated to that yet (a
    parent of the previous version, which started this child from an upgraded package):
    there they are still counted in `pulls`, which the migration then carries over."""
    present = _present(conn, [row[0] for row in run])
    if present:
        run = [row for row in run if row[0] not in present]
    rows: list[object] = []
    for decision_id, user_id, policy, created_at, arm, prompt_version, record in run:
        # A serialized Decision opens with 0x08; one that opens with zlib's 0x78 was
        # compressed by its sender already (a parent from before the writer compressed,
        # meeting a child started from an upgraded package), and is stored as it is.
        data = record if record[:1] == b"\x78" else zlib.compress(record, COMPRESS_LEVEL)
        rows += (decision_id, user_id, policy, created_at, arm, prompt_version, data)
    for start, size in _chunks(len(run), 7, conn):
        conn.execute(
            _multi_row(
                "INSERT INTO decisions (decision_id, user_id, policy, created_at, chosen_arm,"
                " prompt_version, data)",
                "(?, ?, ?, ?, ?, ?, ?)",
                size,
            ),
            rows[7 * start : 7 * (start + size)],
        )
    if run and not _counts_pulls_from_the_log(conn):
        _count_pulls(conn, run)


def _counts_pulls_from_the_log(conn: sqlite3.Connection) -> bool:
    # Read in the batch's transaction, so a migration cannot land between it and the
    # inserts (it needs the write lock this transaction holds).
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'pull_offsets'"
    ).fetchone()
    return row is not None


def _count_pulls(conn: sqlite3.Connection, run: Sequence[DecisionRow]) -> None:
    """The pulls of `run`, per arm, in the `pulls` table of a file from before ADR 0030."""
    pulls: dict[tuple[str, str, str], int] = {}
    for _, user_id, policy, _, arm, _, _ in run:
        key = (user_id, policy, arm)
        pulls[key] = pulls.get(key, 0) + 1
    counts = [v for (user_id, policy, arm), n in pulls.items() for v in (user_id, policy, arm, n)]
    for start, size in _chunks(len(pulls), 4, conn):
        conn.execute(
            _multi_row(
                "INSERT INTO pulls (user_id, policy, arm, n)",
                "(?, ?, ?, ?)",
                size,
                " ON CONFLICT (user_id, policy, arm) DO UPDATE SET n = n + excluded.n",
            ),
            counts[4 * start : 4 * (start + size)],
        )


def attach_shadows(conn: sqlite3.Connection, rows: Sequence[ShadowRow]) -> None:
    """Shadow views, each only beside a decision still logged (not reset or dropped)."""
    conn.executemany(
        "INSERT OR REPLACE INTO decision_shadows (decision_id, data) SELECT ?, ?"
        " WHERE EXISTS (SELECT 1 FROM decisions WHERE decision_id = ?)",
        [(decision_id, data, decision_id) for decision_id, data in rows],
    )


class Conflicted(Exception):
    """A write's condition failed: the state moved past the revision it was computed at,
    or the decision was rewarded (or removed) already. The transaction is rolled back."""


def note_change(
    conn: sqlite3.Connection, origin: int, user_id: str, policy: str, revision: int
) -> None:
    """Append one change (the change feed, `changes`) in the write's own transaction."""
    conn.execute(
        "INSERT INTO changes (user_id, policy, revision, origin) VALUES (?, ?, ?, ?)",
        (user_id, policy, revision, origin),
    )


def put_state(
    conn: sqlite3.Connection,
    user_id: str,
    policy: str,
    *,
    revision: int,
    data: bytes,
    updated_at: float,
    origin: int,
) -> int:
    """Store a user's encoded state if the stored one is still at `revision` (0: none);
    its new revision, announced on the change feed."""
    if revision == 0:
        # Revisions only grow, across resets too (`state_resets`).
        reset = conn.execute(
            "SELECT revision FROM state_resets WHERE user_id = ? AND policy = ?",
            (user_id, policy),
        ).fetchone()
        new_revision = (reset[0] if reset else 0) + 1
        cur = conn.execute(
            "INSERT OR IGNORE INTO state (user_id, policy, revision, data, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (user_id, policy, new_revision, data, updated_at),
        )
    else:
        new_revision = revision + 1
        cur = conn.execute(
            "UPDATE state SET revision = revision + 1, data = ?, updated_at = ?"
            " WHERE user_id = ? AND policy = ? AND revision = ?",
            (data, updated_at, user_id, policy, revision),
        )
    if cur.rowcount != 1:
        raise Conflicted(f"state of {user_id!r} under {policy!r} moved past revision {revision}")
    note_change(conn, origin, user_id, policy, new_revision)
    return new_revision


def mark_rewarded(
    conn: sqlite3.Connection, decision_id: str, reward: float, at: float, source: str
) -> None:
    """Record a decision's reward, once."""
    cur = conn.execute(
        "UPDATE decisions SET reward = ?, rewarded_at = ?, reward_source = ?"
        " WHERE decision_id = ? AND reward IS NULL",
        (reward, at, source, decision_id),
    )
    if cur.rowcount != 1:
        raise Conflicted(f"decision {decision_id!r} is already rewarded or gone")


def off_policy(
    conn: sqlite3.Connection, served: str, shadow: str, *, weight: float, reward: float, dr: float
) -> None:
    """Add one rewarded decision to a (served, shadow) pair's off-policy sums."""
    conn.execute(
        "INSERT INTO off_policy (served, shadow, n, weight_sum, weighted_reward_sum, dr_sum,"
        " dr_sq_sum, reward_sum, sq_n, weight_sq_sum, weight_sq_reward_sum,"
        " weight_sq_reward_sq_sum) VALUES (?, ?, 1, ?, ?, ?, ?, ?, 1, ?, ?, ?)"
        " ON CONFLICT (served, shadow) DO UPDATE SET n = n + 1,"
        " weight_sum = weight_sum + excluded.weight_sum,"
        " weighted_reward_sum = weighted_reward_sum + excluded.weighted_reward_sum,"
        " dr_sum = dr_sum + excluded.dr_sum, dr_sq_sum = dr_sq_sum + excluded.dr_sq_sum,"
        " reward_sum = reward_sum + excluded.reward_sum, sq_n = sq_n + 1,"
        " weight_sq_sum = weight_sq_sum + excluded.weight_sq_sum,"
        " weight_sq_reward_sum = weight_sq_reward_sum + excluded.weight_sq_reward_sum,"
        " weight_sq_reward_sq_sum ="
        " weight_sq_reward_sq_sum + excluded.weight_sq_reward_sq_sum",
        (
            served,
            shadow,
            weight,
            weight * reward,
            dr,
            dr * dr,
            reward,
            weight * weight,
            weight * weight * reward,
            weight * weight * reward * reward,
        ),
    )


def write(conn: sqlite3.Connection, w: Write, revisions: dict[tuple[str, str], int]) -> None:
    """One write of a transaction (a `Write` tuple); a state's new revision goes into
    `revisions`."""
    kind = w[0]
    if kind == "put_state":
        _, user_id, policy, revision, data, updated_at, origin = w
        revisions[(user_id, policy)] = put_state(
            conn,
            user_id,
            policy,
            revision=revision,
            data=data,
            updated_at=updated_at,
            origin=origin,
        )
    elif kind == "mark_rewarded":
        _, decision_id, reward, at, source = w
        mark_rewarded(conn, decision_id, reward, at, source)
    elif kind == "off_policy":
        _, served, shadow, weight, reward, dr = w
        off_policy(conn, served, shadow, weight=weight, reward=reward, dr=dr)
    else:
        raise ValueError(f"unknown write {kind!r}")


def transactions(conn: sqlite3.Connection, txs: Sequence[Sequence[Write]]) -> list[TxResult]:
    """Each transaction in a savepoint of the batch's transaction: one that fails is
    rolled back alone and answered so; an OperationalError (busy, full, I/O) fails the
    whole batch."""
    results: list[TxResult] = []
    for tx in txs:
        conn.execute("SAVEPOINT tx")
        revisions: dict[tuple[str, str], int] = {}
        try:
            for w in tx:
                write(conn, w, revisions)
        except sqlite3.OperationalError:
            raise
        except Exception as e:
            conn.execute("ROLLBACK TO tx")
            conn.execute("RELEASE tx")
            kind = "conflict" if isinstance(e, Conflicted) else "refused"
            results.append((kind, f"{type(e).__name__}: {e}" if kind == "refused" else str(e)))
        else:
            conn.execute("RELEASE tx")
            results.append(("ok", revisions))
    return results


def apply(conn: sqlite3.Connection, steps: Sequence[Step]) -> list[TxResult]:
    """The steps, in order; the results of their transactions (none for rows)."""
    results: list[TxResult] = []
    for kind, rows in steps:
        if kind == "decisions":
            insert_decisions(conn, rows)  # type: ignore[arg-type]
        elif kind == "shadows":
            attach_shadows(conn, rows)  # type: ignore[arg-type]
        elif kind == "transactions":
            results += transactions(conn, rows)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown step {kind!r}")
    return results


def read_frame(stream: BinaryIO) -> object | None:
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    (n,) = FRAME.unpack(head)
    body = stream.read(n)
    if len(body) < n:
        return None
    return pickle.loads(body)  # type: ignore[no-any-return]


def frame(value: object) -> bytes:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(body)) + body


def _commit(conn: sqlite3.Connection, steps: Sequence[Step]) -> tuple[str, Any]:
    try:
        conn.execute("BEGIN IMMEDIATE")
        results = apply(conn, steps)
        conn.execute("COMMIT")
    except sqlite3.OperationalError as e:  # busy, full, read-only, I/O
        return _rolled_back(conn, "transient", f"sqlite: {e}")
    except Exception as e:  # the batch's own fault: a bad row, a constraint
        return _rolled_back(conn, "refused", f"{type(e).__name__}: {e}")
    return "ok", results


def _rolled_back(conn: sqlite3.Connection, kind: str, reason: str) -> tuple[str, str]:
    # A failed COMMIT (a full disk) can leave the transaction open, and every later BEGIN
    # would then fail: nothing of the batch stands, and the next one starts clean.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
    return kind, reason


def main(path: str) -> int:
    # The parent ends the child by closing the pipe, after its last flush. A signal sent
    # to the whole group (Ctrl-C in a terminal, systemd stopping the unit) must not end
    # it before the parent has drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # The parent made the file (WAL, schema). FULL, as the parent's own writer: a batch is
    # on disk before the parent hears of it.
    conn.execute("PRAGMA synchronous=FULL")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        steps = read_frame(stdin)
        if steps is None:
            break
        reply = frame(_commit(conn, steps))  # type: ignore[arg-type]
        try:
            stdout.write(reply)
            stdout.flush()
        except BrokenPipeError:  # the parent is gone; the batch is committed
            conn.close()
            os._exit(0)  # not sys.exit: flushing stdout at exit would fail again, loudly
    conn.close()
    return 0


def _fail(batch: Sequence[tuple[Any, asyncio.Future[Any]]], error: BaseException) -> None:
    for _, answer in batch:
        if not answer.done():
            answer.set_exception(error)


def _answer(batch: Sequence[tuple[Any, asyncio.Future[Any]]], kind: str, payload: Any) -> None:
    """Each transaction's caller hears its own outcome (or the batch's, if it failed)."""
    if kind != "ok":
        _fail(batch, OSError(payload) if kind == "transient" else RefusedBatch(payload))
        return
    for (_, answer), (status, value) in zip(batch, payload, strict=True):
        if answer.done():  # the caller gave up (a deadline); its writes stand
            continue
        if status == "ok":
            answer.set_result(value)
        elif status == "conflict":
            answer.set_exception(Conflicted(value))
        else:
            answer.set_exception(RefusedBatch(value))


class RefusedBatch(Exception):
    """The child could not commit the batch for a reason of the batch's own (a write the
    schema refuses): committing it again as it is would fail again."""


class WriterProcess:
    """The parent's end: one child per store, started by `check` (the server's start) or
    on first use, and again after it died (a batch it took down with it is retried by the
    decision log, and lands once). One batch is in the pipe at a time: the decision log's,
    or the rewards' transactions that arrived while the one before was committed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.starts = 0
        """Children started (more than 1: one died or was stopped, and was replaced)."""
        self._proc: asyncio.subprocess.Process | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False
        # Rewards' transactions waiting for the next frame, and the task that sends them.
        self._pending: list[tuple[list[Write], asyncio.Future[dict[tuple[str, str], int]]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.frames = 0
        """Frames of transactions sent (fewer than transactions: they share frames)."""
        self.paced = 0
        """Frames of transactions that waited for more (`_TX_PACE_S`)."""
        self._sent_at = -float("inf")  # loop.time() of the last frame of transactions
        self._sent_size = 0
        self._group_full = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def check(self) -> None:
        """Start the child and exchange an empty batch with it: a server whose child
        cannot run (no such interpreter, no processes left) fails at start, not at every
        flush after it."""
        await self.commit([])

    async def commit(self, steps: Sequence[Step]) -> None:
        if self._closed:
            raise OSError("the decision writer is closed")
        lock = self._lock_for(asyncio.get_running_loop())
        async with lock:
            kind, reason = await self._exchange(steps)
        if kind == "transient":
            raise OSError(reason)
        if kind == "refused":
            raise RefusedBatch(reason)

    async def transact(self, tx: Sequence[Write]) -> dict[tuple[str, str], int]:
        """Commit one transaction (a reward's writes) in the child, together with those
        that arrive while the frame before is committed: one frame, one commit, one fsync.
        Its states' new revisions once it is on disk; Conflicted if one of its conditions
        failed (nothing of it stands); OSError if its batch could not be committed."""
        if self._closed:
            raise OSError("the decision writer is closed")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dict[tuple[str, str], int]] = loop.create_future()
        self._pending.append((list(tx), answer))
        if len(self._pending) >= _TX_GROUP:
            self._group_full.set()
        sender = self._sender
        if sender is None or sender.done() or sender.get_loop() is not loop:
            self._sender = loop.create_task(self._send_transactions(), name="oo-writer-tx")
        return await answer

    async def _send_transactions(self) -> None:
        loop = asyncio.get_running_loop()
        lock = self._lock_for(loop)
        batch: list[tuple[list[Write], asyncio.Future[dict[tuple[str, str], int]]]] = []
        try:
            while self._pending:
                wait = self._sent_at + _TX_PACE_S - loop.time()
                if (
                    wait > 0
                    and len(self._pending) < _TX_GROUP
                    and (len(self._pending) >= 2 or self._sent_size >= 2)
                ):
                    self.paced += 1
                    self._group_full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._group_full.wait(), wait)
                async with lock:
                    # Taken under the lock: what queued behind a decision log batch goes too.
                    batch = [(tx, f) for tx, f in self._pending if not f.done()]
                    self._pending = []
                    if not batch:
                        continue
                    if self._closed:
                        _fail(batch, OSError("the decision writer is closed"))
                        continue
                    self.frames += 1
                    self._sent_at, self._sent_size = loop.time(), len(batch)
                    try:
                        kind, payload = await self._exchange(
                            [("transactions", [t for t, _ in batch])]
                        )
                    except OSError as e:
                        _fail(batch, e)
                        continue
                try:
                    _answer(batch, kind, payload)
                except Exception as e:  # a reply that does not fit the batch: nobody hangs
                    log.exception(
                        "decision writer: unreadable reply to %d transactions", len(batch)
                    )
                    _fail(batch, RefusedBatch(f"unreadable reply: {e!r}"))
        except BaseException as e:
            # Cancelled (the loop is going) while pacing, waiting for the lock or for the
            # child: whoever waits hears so, queued or sent.
            stopped = OSError(f"the decision writer was interrupted: {e!r}")
            _fail(batch, stopped)
            _fail(self._pending, stopped)
            self._pending = []
            raise

    def _lock_for(self, loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
        if self._loop is not loop or self._lock is None:
            # A store used from another loop (tests, one-off CLI runs): the child's pipes
            # belong to the old loop, and no batch of that loop is in flight any more
            # (nor anyone waiting for one: its callers went with it).
            self._abandon(reap=True)
            self._loop, self._lock = loop, asyncio.Lock()
            self._group_full = asyncio.Event()
            self._pending = [p for p in self._pending if p[1].get_loop() is loop]
        return self._lock

    async def _exchange(self, steps: Sequence[Step]) -> tuple[str, Any]:
        data = frame(list(steps))
        proc = self._proc
        if proc is None or proc.returncode is not None:
            proc = await self._start()
        try:
            await self._send(proc, data)
        except OSError:
            # The child died since the last batch, and asyncio has not noticed yet: this
            # batch never reached it. A new child gets it, once.
            self._abandon()
            proc = await self._start()
            await self._send(proc, data)
        assert proc.stdout is not None
        try:
            (n,) = FRAME.unpack(await proc.stdout.readexactly(FRAME.size))
            reply = pickle.loads(await proc.stdout.readexactly(n))
        except (OSError, EOFError, asyncio.IncompleteReadError) as e:
            self._abandon()
            raise OSError(f"the decision writer process ended: {e}") from e
        except BaseException:
            # Cancelled while the child commits: let it finish that batch and go (end of
            # input), rather than kill it mid-commit; the next batch starts a new child.
            self._detach()
            raise
        return reply  # type: ignore[no-any-return]

    async def _send(self, proc: asyncio.subprocess.Process, data: bytes) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
            await proc.stdin.drain()
        except OSError:
            raise
        except BaseException:
            # Cancelled with part of a frame in the pipe: the child cannot be reused.
            self._abandon()
            raise

    async def _start(self) -> asyncio.subprocess.Process:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",  # no PYTHONPATH, no user site, no script directory on sys.path
            __file__,
            self.path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.starts += 1
        if self.starts > 1:
            log.warning("decision writer process restarted (pid %d)", self._proc.pid)
        return self._proc

    def _abandon(self, reap: bool = False) -> None:
        """Kill the child now. `reap`: also collect its exit status here, for a child
        whose loop (and so whose child watcher) may be gone."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        if reap:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)

    def _detach(self) -> None:
        """Let the child finish what it holds and exit: end of its input."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()

    async def close(self) -> None:
        """End the child: end of input, then its exit (after the batch it holds)."""
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._lock is None:
            self._abandon(reap=True)
            return
        async with self._lock:  # a batch in flight (or a child starting) first
            proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

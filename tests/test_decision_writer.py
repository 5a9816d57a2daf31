"""The decision log's writer process (`OO_DECISION_WRITER=process`, the default of
`oo-ml serve`): a real child on a real SQLite file. What it must hold: every batch lands
once (a child killed mid-flight is replaced, the batch retried, nothing counted twice), a
bad batch is refused without taking the child down, and the child never outlives the
server that started it."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest

from oo.scoring.v1 import scoring_pb2 as pb
from oo.scoring.v1 import scoring_pb2_grpc
from oo_ml.domain.ports import InsertDecision
from oo_ml.errors import TransientStoreError
from oo_ml.stores import codec
from oo_ml.stores.sqlite import decision_writer
from oo_ml.stores.sqlite.decision_writer import RefusedBatch, WriterProcess
from oo_ml.stores.sqlite.scoring import SqliteStore
from tests.conftest import ServerFactory, oo_ml_bin
from tests.helpers import ServerProcess, assert_eventually
from tests.test_store_shared import rec

ARMS = ["focus", "break", "plan", "review"]


def decision(i: int, arm: str = "a") -> InsertDecision:
    return InsertDecision(rec(i, arm=arm))


def rows(path: Path) -> tuple[int, dict[str, int]]:
    """(decisions in the file, user u's by arm), read by a connection of the test's own."""
    conn = sqlite3.connect(path)
    try:
        n = conn.execute("SELECT count(*) FROM decisions").fetchone()[0]
        pulls = dict(
            conn.execute(
                "SELECT chosen_arm, count(*) FROM decisions WHERE user_id = 'u' GROUP BY 1"
            ).fetchall()
        )
        return int(n), pulls
    finally:
        conn.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    # A child that exited but was not reaped yet is a zombie: gone, for this purpose.
    return state != "Z"


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def script(pid: int) -> str:
    """The file name of the script a Python child runs (`python -I <script> ...`)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().split(b"\0")
    return os.path.basename(args[2].decode())


async def test_decision_batches_go_to_a_child_process(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        assert store.writer is not None
        await store.commit([decision(i, arm="a" if i % 3 else "b") for i in range(30)])
        pid = store.writer.pid
        assert pid is not None and pid != os.getpid() and alive(pid)
        assert rows(tmp_path / "s.db") == (30, {"a": 20, "b": 10})
        got = await store.get_decision(rec(7).decision_id)
        assert got is not None
        want = rec(7, arm="a")
        assert (got.record.user_id, got.record.candidates) == (want.user_id, want.candidates)
        assert np.allclose(got.record.x, want.x)
    finally:
        await store.close()
    assert not alive(pid)  # closing the store ends the child


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_both_writers_store_the_codec_s_bytes(tmp_path: Path, writer: str) -> None:
    """The loop hands the writer a serialized record and the writer compresses it (off the
    loop); what lands must be exactly `codec.encode_decision`'s bytes, so the NATS store,
    the old rows and every reader see one format."""
    assert decision_writer.COMPRESS_LEVEL == codec.COMPRESS_LEVEL
    store = SqliteStore.open(tmp_path / "s.db", decision_writer=writer)
    try:
        await store.commit([decision(i, arm="a" if i % 2 else "b") for i in range(5)])
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "s.db")
    try:
        stored = dict(conn.execute("SELECT decision_id, data FROM decisions").fetchall())
    finally:
        conn.close()
    want = {
        r.decision_id: codec.encode_decision(r)
        for r in (rec(i, arm="a" if i % 2 else "b") for i in range(5))
    }
    assert stored == want
    assert all(blob[:1] == b"\x78" for blob in stored.values())  # compressed, as before


async def test_a_record_compressed_by_its_sender_is_stored_as_it_is(tmp_path: Path) -> None:
    """A parent from before the writer compressed may meet a child started from an upgraded
    package: its records arrive compressed, and compressing them again would make them
    unreadable."""
    store = SqliteStore.open(tmp_path / "s.db")  # makes the file and its schema
    writer = WriterProcess(str(tmp_path / "s.db"))
    r = rec(3)
    try:
        await writer.commit(
            [
                (
                    "decisions",
                    [
                        (
                            r.decision_id,
                            r.user_id,
                            r.policy,
                            r.created_at,
                            r.chosen.arm,
                            "",
                            codec.encode_decision(r),
                        )
                    ],
                )
            ]
        )
        got = await store.get_decision(r.decision_id)
    finally:
        await writer.close()
        await store.close()
    assert got is not None and got.record.candidates == r.candidates


async def test_a_batch_whose_reply_was_lost_lands_once_when_retried(tmp_path: Path) -> None:
    """The child commits, then dies before its reply: the decision log retries the whole
    batch, which must insert nothing twice and count no pull twice."""
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        batch = [decision(i) for i in range(5)]
        await store.commit(batch)
        await store.commit([*batch, decision(5)])  # the retry, plus one decision more
        assert rows(tmp_path / "s.db") == (6, {"a": 6})
    finally:
        await store.close()


async def stopped_holding(
    store: SqliteStore, write: InsertDecision
) -> tuple[int, asyncio.Task[dict[tuple[str, str], int]]]:
    """After one batch, the child stopped (SIGSTOP) with `write`'s batch unread in its
    pipe: (its pid, the commit waiting for it)."""
    assert store.writer is not None
    await store.commit([decision(0)])
    pid = store.writer.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    in_flight = asyncio.create_task(store.commit([write]))
    await asyncio.sleep(0.2)
    assert not in_flight.done()
    return pid, in_flight


async def test_a_child_killed_mid_batch_fails_it_transiently_and_is_replaced(
    tmp_path: Path,
) -> None:
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        assert store.writer is not None
        first, in_flight = await stopped_holding(store, decision(1))
        os.kill(first, signal.SIGKILL)
        with pytest.raises(TransientStoreError, match="decision writer process ended"):
            await in_flight
        await store.commit([decision(1)])  # the decision log's retry: a new child
        second = store.writer.pid
        assert second not in (None, first) and store.writer.starts == 2
        # A child that died between batches (whether or not asyncio has seen it yet) is
        # replaced, and the next batch goes to the new one without failing.
        assert second is not None
        os.kill(second, signal.SIGKILL)
        await assert_eventually(lambda: _gone(second), within=5)
        await store.commit([decision(2)])
        assert store.writer.starts == 3
        assert rows(tmp_path / "s.db") == (3, {"a": 3})
    finally:
        await store.close()


async def _gone(pid: int) -> None:
    assert not alive(pid)


async def test_a_commit_cancelled_mid_batch_lets_the_child_finish_it(tmp_path: Path) -> None:
    """The flush is cancelled (the loop is torn down) while the child commits: the child
    is not killed mid-commit but finishes the batch and exits; the next batch gets a new
    child, and the batch, retried, lands once."""
    store = SqliteStore.open(tmp_path / "s.db", decision_writer="process")
    try:
        assert store.writer is not None
        pid, in_flight = await stopped_holding(store, decision(1))
        in_flight.cancel()
        with pytest.raises(asyncio.CancelledError):
            await in_flight
        os.kill(pid, signal.SIGCONT)
        await assert_eventually(lambda: _gone(pid), within=10)
        assert rows(tmp_path / "s.db") == (2, {"a": 2})  # it committed, then ended
        await store.commit([decision(1), decision(2)])  # the log's retry, and more
        assert store.writer.starts == 2
        assert rows(tmp_path / "s.db") == (3, {"a": 3})
    finally:
        await store.close()


async def test_a_bad_batch_is_refused_and_the_child_keeps_serving(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "s.db")  # makes the file and its schema
    writer = WriterProcess(str(tmp_path / "s.db"))
    try:
        with pytest.raises(RefusedBatch, match="unknown step 'nonsense'"):
            await writer.commit([("nonsense", [])])
        with pytest.raises(RefusedBatch, match="ValueError: not enough values"):
            await writer.commit([("decisions", [("d1", "u", "p")])])  # type: ignore[list-item]
        await writer.commit([("decisions", [("d1", "u", "p", 1.0, "a", "", b"x")])])
        assert writer.starts == 1
        assert rows(tmp_path / "s.db") == (1, {"a": 1})
    finally:
        await writer.close()
        await store.close()


async def test_serve_logs_decisions_through_the_child(server_factory: ServerFactory) -> None:
    srv = await server_factory()
    for i in range(20):
        await srv.stub.Score(
            pb.ScoreRequest(
                user_id=f"u{i % 2}",
                candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in ARMS],
            )
        )
    store = srv.app.store
    assert isinstance(store, SqliteStore) and store.writer is not None
    assert (await srv.stub.Stats(pb.StatsRequest())).decisions == 20
    assert store.writer.starts == 1 and store.writer.pid is not None


async def test_a_crashed_server_leaves_no_writer_or_probe_process_behind(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """kill -9 of `oo-ml serve`: its children (the decision writer, the change feed's
    probe) see their pipes close and end (the writer after the batch it holds, if any), so
    nothing is left writing to the file or reading it."""
    server = ServerProcess(
        [oo_ml_bin(), "serve", "--port", "0", "--data-dir", str(tmp_path), "--no-ingest"],
        clean_env,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            for _ in range(5):
                await stub.Score(
                    pb.ScoreRequest(
                        user_id="u", candidates=[pb.Candidate(tip_id=f"tip-{a}") for a in ARMS]
                    )
                )
            await stub.Stats(pb.StatsRequest())  # a flush: the child has started
        kids: dict[str, int] = {}

        async def both_running() -> None:
            kids.update({script(pid): pid for pid in children(server.proc.pid)})
            assert set(kids) == {"decision_writer.py", "change_probe.py"}
            assert all(alive(pid) for pid in kids.values())

        await assert_eventually(both_running, within=10)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
        for pid in kids.values():
            await assert_eventually(lambda pid=pid: _gone(pid), within=10)
    finally:
        server.kill()


def test_a_failed_commit_leaves_no_transaction_open(tmp_path: Path) -> None:
    """A COMMIT that fails (a full disk; here a deferred foreign key, which fails only at
    COMMIT) must not leave its transaction open, or every later batch would fail."""
    conn = sqlite3.connect(tmp_path / "fk.db", isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("CREATE TABLE users (id TEXT PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE decisions (decision_id TEXT PRIMARY KEY, user_id TEXT, policy TEXT,"
        " created_at REAL, chosen_arm TEXT, prompt_version TEXT, data BLOB,"
        " FOREIGN KEY (user_id) REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    # A file from before ADR 0030 (no `pull_offsets`): the writer counts pulls here too.
    conn.execute(
        "CREATE TABLE pulls (user_id TEXT, policy TEXT, arm TEXT, n INTEGER,"
        " PRIMARY KEY (user_id, policy, arm))"
    )
    row = ("d1", "u", "p", 1.0, "a", "", b"x")
    kind, reason = decision_writer._commit(conn, [("decisions", [row])])
    assert (kind, "FOREIGN KEY" in reason) == ("refused", True)
    assert not conn.in_transaction
    conn.execute("INSERT INTO users VALUES ('u')")
    assert decision_writer._commit(conn, [("decisions", [row])]) == ("ok", [])
    assert conn.execute("SELECT count(*) FROM decisions").fetchone() == (1,)
    assert conn.execute("SELECT n FROM pulls").fetchone() == (1,)
    conn.close()

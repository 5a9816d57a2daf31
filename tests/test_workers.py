"""`oo-ml serve --workers 2` over one SQLite file: real processes on a loopback port 0.

Which worker answers a call is the kernel's choice (SO_REUSEPORT spreads connections), so
the tests open channels until each worker has one, telling them apart by the `server`
(host/pid) that Stats reports; a channel keeps its one connection, so its calls all go
to the same worker.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from nats.aio.client import Client

from oo.scoring.v1 import scoring_pb2 as pb
from oo.scoring.v1 import scoring_pb2_grpc
from oo_ml.domain.events import Event, TipViewed
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.sqlite.db import SqliteDB
from oo_ml.stores.sqlite.profiles import SqliteProfileStore
from tests.conftest import oo_ml_bin
from tests.helpers import assert_eventually
from tests.natsfix import COMPLETED, feedback, running_nats, viewed

Stub = scoring_pb2_grpc.ScoringServiceStub


class Workers:
    """`oo-ml serve --workers N` in a subprocess, its stderr in a file (a full pipe would
    stall it); the address from its one stdout line."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str, workers: int = 2) -> None:
        self.data = tmp_path / "data"
        self.log_path = tmp_path / "serve.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                oo_ml_bin(),
                "serve",
                f"--workers={workers}",
                "--port=0",
                f"--data-dir={self.data}",
                *args,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not match:
            self.close()
            raise AssertionError(f"did not start: {line!r}\n{self.log()[-3000:]}")
        self.address = f"{match.group(1)}:{match.group(2)}"
        self.channels: list[grpc.aio.Channel] = []

    @property
    def db(self) -> Path:
        return self.data / "oo-ml.db"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """The worker processes (the parent's other child may be its nats-server)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        kids = []
        for pid in path.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--worker" in cmdline:
                kids.append(int(pid))
        return kids

    async def by_worker(self, n: int = 2, tries: int = 64) -> dict[str, Stub]:
        """A stub on a connection of its own to each of `n` workers, by server id."""
        found: dict[str, Stub] = {}
        for _ in range(tries):
            # A local subchannel pool: a new TCP connection, not one shared with the others.
            ch = grpc.aio.insecure_channel(
                self.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            stub = Stub(ch)
            server = (await stub.Stats(pb.StatsRequest(), timeout=10)).server
            if server in found:
                await ch.close()
                continue
            self.channels.append(ch)
            found[server] = stub
            if len(found) == n:
                return found
        raise AssertionError(f"reached {sorted(found)} only, in {tries} connections")

    async def aclose(self) -> None:
        for ch in self.channels:
            await ch.close()
        self.close()

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM first, even after a failure: a parent killed with -9 leaves its
            # nats-server running (the next start on the data dir would stop it).
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._log.close()


def count(db: Path, sql: str) -> float:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return float(conn.execute(sql).fetchone()[0] or 0)
    finally:
        conn.close()


def score(user: str, *arms: str) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        user_id=user, candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in arms]
    )


def scores(answer: pb.ScoreResponse) -> dict[str, float]:
    return {c.arm: c.score for c in answer.ranking}


async def test_a_reward_through_one_worker_reaches_the_other_within_a_second(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    # Greedy, no exploration, no prior refresh (a prior built from this user's model
    # would reach B's view without any change feed): B's Score shows exactly its model.
    env = {**clean_env, "OO_EPSILON": "0", "OO_MIN_EXPLORATION": "0", "OO_PRIOR_REFRESH_S": "3600"}
    server = Workers(tmp_path, env, "--no-ingest")
    try:
        (id_a, a), (id_b, b) = (await server.by_worker()).items()
        # B makes a decision and caches the user's (empty) model while doing so.
        made = await b.Score(score("ann", "focus"), timeout=10)
        assert scores(await b.Score(score("ann", "focus", "pause"), timeout=10)) == {
            "focus": 0.0,
            "pause": 0.0,
        }
        # A rewards it at once: B may not have flushed it yet, so A waits for it (the
        # join wait) instead of answering NOT_FOUND.
        rewarded = await a.Reward(pb.RewardRequest(decision_id=made.decision_id, reward=1.0))
        assert rewarded.applied and rewarded.arm == "focus"
        t0 = time.monotonic()

        async def b_has_the_new_model() -> None:
            stats = await b.Stats(pb.StatsRequest(user_id="ann"), timeout=10)
            assert stats.server == id_b and stats.rewarded == 1, stats
            answer = await b.Score(score("ann", "focus", "pause"), timeout=10)
            assert scores(answer)["focus"] > 0.0 and answer.chosen_tip_id == "tip-focus"

        await assert_eventually(b_has_the_new_model, within=5, interval=0.01)
        took = time.monotonic() - t0
        print(f"worker B used the new model after {1000 * took:.0f} ms")
        assert took < 1.0, f"worker B used the new model only after {took:.3f}s"
        stats_a = await a.Stats(pb.StatsRequest(user_id="ann"), timeout=10)
        assert stats_a.server == id_a and stats_a.rewarded == 1
        assert server.stop() == 0
    finally:
        await server.aclose()


async def test_500_concurrent_rewards_for_one_user_over_both_workers_lose_none(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    server = Workers(tmp_path, clean_env, "--no-ingest")
    try:
        workers = await server.by_worker()
        stubs = list(workers.values())
        made: list[tuple[Stub, str]] = []
        for batch in range(10):
            answers = await asyncio.gather(
                *(stubs[i % 2].Score(score("bob", "a", "b", "c"), timeout=30) for i in range(50))
            )
            made += [(stubs[(i + batch) % 2], r.decision_id) for i, r in enumerate(answers)]
        # Each reward goes to the other worker half the time; all 500 at once.
        results = await asyncio.gather(
            *(
                stub.Reward(pb.RewardRequest(decision_id=d, reward=1.0), timeout=60)
                for stub, d in made
            )
        )
        assert all(r.applied for r in results)
        # The model learned from every one of them: one compare-and-set each, none lost.
        assert count(server.db, "SELECT revision FROM state WHERE user_id = 'bob'") == 500
        assert count(server.db, "SELECT count(*) FROM decisions WHERE reward IS NOT NULL") == 500
        # Each worker's Stats reads its cached model, which follows the other worker's
        # writes through the change feed: within a second (the contract), not at once.
        for stub in stubs:

            async def stats_count_all(stub: Stub = stub) -> None:
                stats = await stub.Stats(pb.StatsRequest(user_id="bob"), timeout=10)
                assert stats.rewarded == 500 and sum(a.rewarded for a in stats.arms) == 500

            await assert_eventually(stats_count_all, within=1.0, interval=0.01)
        assert server.stop() == 0
    finally:
        await server.aclose()


async def test_each_ingested_event_is_applied_once_across_the_workers(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    decisions_each, views = 100, 1000
    async with running_nats(tmp_path / "nats") as nats:
        env = {**clean_env, "OO_NATS_URL": nats.url, "OO_INGEST_BATCH": "100"}
        server = Workers(tmp_path, env)
        nc = Client()
        try:
            stubs = list((await server.by_worker()).values())
            decisions: list[str] = []
            for stub in stubs:
                answers = await asyncio.gather(
                    *(stub.Score(score("cat", "a", "b"), timeout=30) for _ in range(decisions_each))
                )
                decisions += [r.decision_id for r in answers]
            await nc.connect(nats.url)
            js = nc.jetstream()
            events = [feedback(f"fb-{i}", d, COMPLETED, "cat") for i, d in enumerate(decisions)]
            events += [viewed(f"view-{i}", 1000 + i, "viewer") for i in range(views)]
            acks = [
                await js.publish_async(
                    "feedback.tip" if e.HasField("tip_feedback") else "signals.tip.viewed",
                    e.SerializeToString(),
                )
                for e in events
            ]
            await asyncio.gather(*acks)
            # Every Score published a serve signal; then come the feedback and the views.
            served = len(decisions)
            total = served + len(events)

            async def all_applied() -> None:
                assert count(server.db, "SELECT count(*) FROM ingest_applied") == total

            await assert_eventually(all_applied, 30)
            mean_dwell = sum(1000 + i for i in range(views)) / views
            for stub in stubs:
                stats = await stub.Stats(pb.StatsRequest(user_id="viewer"), timeout=10)
                assert stored_features(stats)["mean_dwell_ms_30d"] == mean_dwell

            # Another process records a view on the file: both workers have the viewer's
            # features cached (for OO_FEATURE_CACHE_S, 30 s), and the change sequence
            # makes both drop them within a second.
            await record_elsewhere(server.db, [tip_viewed("elsewhere-1", "viewer", 1000 + views)])
            written_at = time.monotonic()
            mean_dwell = sum(1000 + i for i in range(views + 1)) / (views + 1)

            async def both_see_it() -> None:
                for stub in stubs:
                    stats = await stub.Stats(pb.StatsRequest(user_id="viewer"), timeout=10)
                    assert stored_features(stats)["mean_dwell_ms_30d"] == mean_dwell

            await assert_eventually(both_see_it, within=5, interval=0.01)
            took = time.monotonic() - written_at
            print(f"both workers saw the new profile after {1000 * took:.0f} ms")
            assert took < 1.0, f"the workers saw the new profile after {took:.3f}s"
            await asyncio.sleep(1.0)  # any stray redelivery would land now
            assert count(server.db, "SELECT count(*) FROM ingest_applied") == total + 1
            assert count(server.db, "SELECT total(served) FROM ingest_daily") == served
            assert count(server.db, "SELECT total(completed) FROM ingest_daily") == len(decisions)
            assert count(server.db, "SELECT total(views) FROM ingest_daily") == views + 1
            stats = [await s.Stats(pb.StatsRequest(), timeout=10) for s in stubs]
            assert stats[0].rewarded == len(decisions)
            # Each message went to one worker: their counters add up to the events, once.
            per_worker = [dict(s.ingest) for s in stats]
            assert sum(w["applied"] for w in per_worker) == total, per_worker
            assert sum(w["duplicates"] for w in per_worker) == 0, per_worker
            assert sum(w["rewards_applied"] for w in per_worker) == len(decisions), per_worker
            print("applied per worker:", [w["applied"] for w in per_worker])
            assert server.stop() == 0
        finally:
            await nc.close()
            await server.aclose()


async def record_elsewhere(db: Path, events: list[Event]) -> None:
    """Record events in the workers' file from this process: another writer on it."""
    profiles = SqliteProfileStore(SqliteDB(db), 7 * 86400.0, ALL_FEATURES)
    try:
        assert await profiles.record(events, time.time()) == [True] * len(events)
    finally:
        await profiles.db.close()


def tip_viewed(event_id: str, user_id: str, dwell_ms: int) -> Event:
    return Event(event_id, user_id, time.time(), "tip_viewed", TipViewed("", "t", dwell_ms))


def stored_features(answer: pb.StatsResponse) -> dict[str, float]:
    """The profile values the server read from its store (Stats reads them as Score does,
    from the same cache, and publishes no serve signal)."""
    return {
        f.name: f.value
        for f in answer.features
        if f.origin == pb.FeatureOrigin.FEATURE_ORIGIN_PROFILE_STORE
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent."""
    try:
        return b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return False


def nats_servers_on(store: Path) -> list[int]:
    """Pids of nats-server processes whose command line names this store."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"nats-server") and str(store).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


async def test_one_local_nats_metrics_of_every_worker_restart_and_stop(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    metrics_port = free_port()
    env = {**clean_env, "OO_METRICS_PORT": str(metrics_port)}
    server = Workers(tmp_path, env)  # ingest on, no OO_NATS_URL: the parent starts NATS
    try:
        assert len(nats_servers_on(server.data / "nats")) == 1
        workers = await server.by_worker()
        for stub in workers.values():
            await stub.Score(score("dan", "a"), timeout=10)

        def scrape() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                return str(r.read().decode())

        text = await asyncio.to_thread(scrape)
        for k in ("0", "1"):
            assert f'oo_worker_up{{worker="{k}"}} 1.0' in text
            scored = re.search(
                rf'oo_rpc_total{{code="OK",method="Score",worker="{k}"}} (\d+)', text
            )
            assert scored and float(scored.group(1)) >= 1, text[:2000]

        # A worker that dies is started again, on the same port.
        victim = server.children()[0]
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> None:
            kids = server.children()
            assert victim not in kids and len(kids) == 2
            fresh = await server.by_worker(tries=64)
            assert f"/{victim}" not in " ".join(fresh)

        await assert_eventually(replaced, within=30, interval=0.2)
        assert "starting it again" in server.log()
        text = await asyncio.to_thread(scrape)
        assert re.search(r'oo_worker_restarts_total{worker="\d"} 1\.0', text)

        kids = server.children()
        assert server.stop() == 0
        assert not [pid for pid in kids if running(pid)]
        assert nats_servers_on(server.data / "nats") == []
    finally:
        await server.aclose()


def test_a_taken_port_fails_the_start(tmp_path: Path, clean_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        # As another `oo-ml serve --workers` would hold it: grpc's SO_REUSEPORT would let
        # the workers join it without a word, so the parent must check first.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                oo_ml_bin(),
                "serve",
                "--workers=2",
                f"--port={port}",
                "--no-ingest",
                f"--data-dir={tmp_path}",
            ],
            check=False,
            env=clean_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr
    assert "listening" not in done.stdout


def test_the_parent_imports_no_grpc() -> None:
    code = (
        "import sys; import oo_ml.cli, oo_ml.app.workers;"
        " print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'oo')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("workers", ["0", "65"])
def test_workers_out_of_range_is_refused(workers: str, clean_env: dict[str, str]) -> None:
    done = subprocess.run(
        [oo_ml_bin(), "serve", "--workers", workers, "--port", "0"],
        check=False,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "OO_WORKERS" in done.stderr

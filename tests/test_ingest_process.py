"""The real `oo-ml serve` process: kill -9 in the middle of ingesting, restart, and every
published event has taken effect exactly once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
from nats.aio.client import Client

from oo.scoring.v1 import scoring_pb2 as pb
from oo.scoring.v1 import scoring_pb2_grpc
from tests.helpers import assert_eventually
from tests.natsfix import COMPLETED, feedback, running_nats, viewed

DECISIONS = 300
VIEWS = 1700


class Serve:
    """`oo-ml serve` with stderr to a file (a full pipe would stall the server)."""

    def __init__(self, data_dir: Path, env: dict[str, str], log: Path) -> None:
        exe = Path(sys.executable).parent / "oo-ml"
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--port", "0", "--data-dir", str(data_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not match:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not start: {line!r}\n{log.read_text()[-3000:]}")
        self.address = f"{match.group(1)}:{match.group(2)}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.log.close()


def count(db: Path, sql: str) -> float:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return float(conn.execute(sql).fetchone()[0] or 0)
    finally:
        conn.close()


async def test_kill_9_mid_batch_and_restart_apply_every_event_exactly_once(tmp_path: Path) -> None:
    async with running_nats(tmp_path / "nats") as nats:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OO_")}
        # A short ack wait, so what the killed process held is redelivered quickly.
        env.update(OO_NATS_URL=nats.url, OO_INGEST_ACK_WAIT_S="1", OO_INGEST_BATCH="100")
        data = tmp_path / "data"
        db = data / "oo-ml.db"
        applied_sql = "SELECT count(*) FROM ingest_applied"
        first = Serve(data, env, tmp_path / "serve.log")
        nc = Client()
        try:
            async with grpc.aio.insecure_channel(first.address) as channel:
                stub = scoring_pb2_grpc.ScoringServiceStub(channel)
                request = pb.ScoreRequest(
                    user_id="u1",
                    candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in "abc"],
                )
                decisions: list[str] = []
                for _ in range(DECISIONS // 50):
                    answers = await asyncio.gather(*(stub.Score(request) for _ in range(50)))
                    decisions += [a.decision_id for a in answers]

            async def served() -> None:  # our own serve signals came back through signals.>
                assert count(db, applied_sql) == DECISIONS

            await assert_eventually(served, 15)

            await nc.connect(nats.url)
            js = nc.jetstream()
            events = [feedback(f"fb-{i}", d, COMPLETED) for i, d in enumerate(decisions)]
            events += [viewed(f"view-{i}", 1000 + i) for i in range(VIEWS)]
            acks = [
                await js.publish_async(
                    "feedback.tip" if e.HasField("tip_feedback") else "signals.tip.viewed",
                    e.SerializeToString(),
                )
                for e in events
            ]
            await asyncio.gather(*acks)

            total = DECISIONS + len(events)

            async def ingesting() -> None:
                assert count(db, applied_sql) >= DECISIONS + 100

            await assert_eventually(ingesting, 15, 0.002)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait()
            at_kill = count(db, applied_sql)
            print(f"applied when killed: {at_kill:.0f} of {total}")
            assert DECISIONS < at_kill < total, "the kill should land mid-ingest"
        finally:
            first.close()

        second = Serve(data, env, tmp_path / "serve.log")
        try:

            async def all_applied() -> None:
                assert count(db, applied_sql) == total

            await assert_eventually(all_applied, 20)
            await asyncio.sleep(1.5)  # past the ack wait: any stray redelivery would show now
            assert count(db, applied_sql) == total
            assert count(db, "SELECT total(served) FROM ingest_daily") == DECISIONS
            assert count(db, "SELECT total(feedback) FROM ingest_daily") == DECISIONS
            assert count(db, "SELECT total(completed) FROM ingest_daily") == DECISIONS
            assert count(db, "SELECT total(views) FROM ingest_daily") == VIEWS
            dwell = sum(1000 + i for i in range(VIEWS))
            assert count(db, "SELECT total(dwell_ms_sum) FROM ingest_daily") == dwell
            async with grpc.aio.insecure_channel(second.address) as channel:
                stub = scoring_pb2_grpc.ScoringServiceStub(channel)
                stats = await stub.Stats(pb.StatsRequest())
                assert stats.rewarded == DECISIONS and stats.decisions == DECISIONS
            second.proc.send_signal(signal.SIGTERM)
            assert second.proc.wait(timeout=30) == 0
        finally:
            second.close()
            await nc.close()

"""The SQLite change sequence: two stores on one file, as two processes would have them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from oo_ml.config import ScoringConfig
from oo_ml.domain.engine import ScoringEngine
from oo_ml.domain.engine.types import Candidate, ScoreCommand
from oo_ml.domain.events import Event, TipViewed
from oo_ml.domain.features import Inputs, NoStoredFeatures
from oo_ml.domain.ports import EVERY_POLICY, EVERY_USER, PROFILE, Change, PutState
from oo_ml.domain.state import empty_state
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.codec import encode_state
from oo_ml.stores.sqlite import change_probe
from oo_ml.stores.sqlite.changes import SqliteChangeFeed
from oo_ml.stores.sqlite.profiles import SqliteProfileStore
from oo_ml.stores.sqlite.scoring import SqliteStore
from tests.helpers import assert_eventually

STATE = empty_state("egreedy", "v1", 7, 1.0)


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    a, b = SqliteStore.open(tmp_path / "x.db"), SqliteStore.open(tmp_path / "x.db")
    yield a, b
    await a.close()
    await b.close()


class Follower:
    def __init__(self, feed: SqliteChangeFeed, catch_up: bool = True) -> None:
        self.feed = feed
        self.catch_up = catch_up
        self.seen: list[Change] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def apply(self, changes: Sequence[Change]) -> None:
        self.seen.extend(changes)

    async def __aenter__(self) -> Follower:
        if self.catch_up:
            await self.feed.catch_up()
        self.task = asyncio.create_task(self.feed.follow(self.apply, self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task


async def test_the_other_stores_writes_arrive_and_our_own_do_not(
    two: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = two
    async with Follower(SqliteChangeFeed(b.db)) as follower:
        await b.commit([PutState("mine", "egreedy", 0, STATE)])  # b's own: not reported
        await a.commit([PutState("ann", "egreedy", 0, STATE)])
        await a.commit([PutState("ann", "egreedy", 1, STATE)])
        await a.reset_user("bob")
        profiles = SqliteProfileStore(a.db, 86400.0 * 7, ALL_FEATURES)
        view = Event("e1", "cat", time.time(), "tip_viewed", TipViewed("", "t", 900))
        assert await profiles.record([view, view], time.time()) == [True, False]

        async def all_arrived() -> None:
            assert follower.seen == [
                Change("ann", "egreedy", 1),
                Change("ann", "egreedy", 2),
                Change("bob", EVERY_POLICY, 0),
                Change("cat", PROFILE, 0),
            ]

        await assert_eventually(all_arrived, within=5)


async def test_a_follower_behind_the_prune_drops_everything(
    two: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = two
    behind = SqliteChangeFeed(b.db)
    await behind.catch_up()  # then frozen: it reads nothing while a writes and prunes
    await a.commit([PutState("ann", "egreedy", 0, STATE)])
    pruner = SqliteChangeFeed(a.db, retention_s=0.0)
    assert await pruner.prune() == 1
    async with Follower(behind, catch_up=False) as follower:

        async def lost_track() -> None:
            assert follower.seen == [Change(EVERY_USER, EVERY_POLICY, 0)]

        await assert_eventually(lost_track, within=5)
        assert behind.lost_track == 1
        # and from there on, it follows as before
        await a.commit([PutState("ann", "egreedy", 1, STATE)])

        async def caught_up() -> None:
            assert follower.seen[1:] == [Change("ann", "egreedy", 2)]

        await assert_eventually(caught_up, within=5)


async def test_seq_numbers_are_never_reused_after_a_prune(
    two: tuple[SqliteStore, SqliteStore],
) -> None:
    a, _ = two
    feed = SqliteChangeFeed(a.db, retention_s=0.0)
    await a.commit([PutState("ann", "egreedy", 0, STATE)])
    await feed.prune()
    await feed.catch_up()
    first = feed.last
    await a.commit([PutState("bob", "egreedy", 0, STATE)])
    await feed.catch_up()
    assert feed.last == first + 1 == 2


async def test_a_write_through_does_not_put_back_a_model_a_newer_write_replaced(
    two: tuple[SqliteStore, SqliteStore],
) -> None:
    """Worker A's reward commits revision R+1; before A writes its model through to its
    cache, worker B commits R+2 and A's feed reports it. A's cache must not end at R+1
    (a model older than the store's, served until the key changes again)."""
    sa, sb = two
    cfg = ScoringConfig(default_policy="egreedy-v2")
    ea = ScoringEngine(cfg, sa, NoStoredFeatures(), ALL_FEATURES)
    eb = ScoringEngine(cfg, sb, NoStoredFeatures(), ALL_FEATURES)
    cmd = ScoreCommand("u", tuple(Candidate(f"t-{a}", a) for a in ("x", "y")), Inputs({}), "")
    policy = ea.policy("").name
    first, second = (await ea.score(cmd)).record, (await eb.score(cmd)).record
    await ea.log.durable()
    await eb.log.durable()
    commit = sa.commit

    async def commit_then_b_writes(writes: Any) -> dict[tuple[str, str], int]:
        revisions = await commit(writes)
        eb.models.forget("u", policy)
        assert (await eb.reward(second.decision_id, 0.0)).applied
        newer = await sb.get("u", policy)
        assert newer is not None
        ea.models.apply([Change("u", policy, newer.revision)])  # A's feed, meanwhile
        return revisions

    sa.commit = commit_then_b_writes  # type: ignore[method-assign]
    assert (await ea.reward(first.decision_id, 1.0)).applied
    sa.commit = commit  # type: ignore[method-assign]
    stored = await sa.get("u", policy)
    assert stored is not None
    cached = ea.models.cached("u", policy)
    assert cached is None or (
        cached[0] == stored.revision and encode_state(cached[1]) == encode_state(stored.state)
    )
    _, state = await ea.models.load("u", ea.policy(""))
    assert encode_state(state) == encode_state(stored.state)
    assert state.arms[first.chosen.arm].rewarded >= 1
    for e in (ea, eb):
        await e.close()


# The probe child (`change_probe`): the tests below set the feed's periodic full read to an
# hour, so whatever arrives within seconds was woken by the probe.
NO_FULL_READ = 3600.0


async def test_the_probe_wakes_the_follower_for_another_stores_write(
    two: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = two
    async with Follower(SqliteChangeFeed(b.db, full_read_s=NO_FULL_READ)) as follower:
        await assert_eventually(_started(follower.feed), within=10)
        await a.commit([PutState("ann", "egreedy", 0, STATE)])

        async def arrived() -> None:
            assert follower.seen == [Change("ann", "egreedy", 1)]

        await assert_eventually(arrived, within=5)
        probe = follower.feed.probe
        assert probe is not None and probe.wakes >= 1


async def test_the_probe_does_not_wake_the_follower_for_its_own_writes(
    two: tuple[SqliteStore, SqliteStore],
) -> None:
    """A process's own rows (its caches took them by write-through) move the head at
    every commit under Reward load; the probe must not wake the loop for them."""
    a, b = two
    async with Follower(SqliteChangeFeed(b.db, full_read_s=NO_FULL_READ)) as follower:
        await assert_eventually(_started(follower.feed), within=10)
        probe = follower.feed.probe
        assert probe is not None
        # A foreign write first: once it arrived, the child is polling.
        await a.commit([PutState("ann", "egreedy", 0, STATE)])

        async def polling() -> None:
            assert follower.seen == [Change("ann", "egreedy", 1)]

        await assert_eventually(polling, within=5)
        before = probe.wakes
        for i in range(20):
            await b.commit([PutState(f"mine-{i}", "egreedy", 0, STATE)])
        await asyncio.sleep(10 * follower.feed.poll_s)  # ten polls, at least
        assert probe.wakes == before
        await a.commit([PutState("bob", "egreedy", 0, STATE)])

        async def woken() -> None:
            assert probe.wakes > before
            assert follower.seen[1:] == [Change("bob", "egreedy", 1)]

        await assert_eventually(woken, within=5)


async def test_a_probe_that_dies_is_replaced_and_one_that_stops_ends(
    two: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = two
    async with Follower(SqliteChangeFeed(b.db, full_read_s=NO_FULL_READ)) as follower:
        await assert_eventually(_started(follower.feed), within=10)
        probe = follower.feed.probe
        assert probe is not None and probe.pid is not None
        first = probe.pid
        os.kill(first, signal.SIGKILL)

        async def replaced() -> None:
            assert probe.starts == 2 and probe.pid not in (None, first)

        await assert_eventually(replaced, within=10)
        await a.commit([PutState("ann", "egreedy", 0, STATE)])

        async def arrived() -> None:
            assert Change("ann", "egreedy", 1) in follower.seen

        await assert_eventually(arrived, within=5)
        second = probe.pid
    assert second is not None
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)  # reaped: gone with the follower


def test_a_probe_that_cannot_read_the_file_says_so_and_ends_with_its_input(
    tmp_path: Path,
) -> None:
    missing = str(tmp_path / "no" / "x.db")
    with subprocess.Popen(
        [sys.executable, "-I", change_probe.__file__, missing, "0.01", "1", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.read(1) == change_probe.UNREADABLE
        child.stdin.close()
        assert child.wait(timeout=10) == 0


def _started(feed: SqliteChangeFeed) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        assert feed.probe is not None and feed.probe.pid is not None

    return check


async def test_a_probe_that_keeps_dying_is_restarted_less_and_less_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that cannot run (here: a NaN poll interval, which its select refuses) is
    started again after longer and longer pauses (1, 2, 4 ... s; scaled down here), not
    every second forever; and a stop ends a pause at once."""
    monkeypatch.setattr(change_probe, "_RESTART_PAUSE_S", 0.05)
    monkeypatch.setattr(change_probe, "_RESTART_PAUSE_MAX_S", 0.4)
    probe = change_probe.ProbeProcess(
        str(tmp_path / "x.db"), float("nan"), 1, lambda: None, lambda: 0
    )
    with caplog.at_level(logging.WARNING, logger=change_probe.__name__):
        probe.start()
        try:

            async def five_starts() -> None:
                assert probe.starts >= 5

            await assert_eventually(five_starts, within=30)
        finally:
            await probe.stop()
    pauses = [r.args[1] for r in caplog.records if "starting another" in r.getMessage()]
    assert pauses[:4] == [0.05, 0.1, 0.2, 0.4]


async def test_a_stop_does_not_wait_out_a_restart_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(change_probe, "_RESTART_PAUSE_S", 30.0)
    probe = change_probe.ProbeProcess(
        str(tmp_path / "x.db"), float("nan"), 1, lambda: None, lambda: 0
    )
    probe.start()

    async def dead_once() -> None:
        assert probe.starts == 1 and probe._proc is not None
        assert probe._proc.returncode is not None

    await assert_eventually(dead_once, within=10)
    await asyncio.sleep(0.1)  # into the 30 s pause
    started = time.monotonic()
    await probe.stop()
    assert time.monotonic() - started < 2

"""Faults under traffic, each a test (issue 11, item 4; the table is docs/faults.md).

Every test drives real gRPC clients against `oo-ml serve` replicas on OO_STATE=nats:
warm users, each a loop of Score on one replica then Reward (1.0) of that decision on
another, concurrently. A fault strikes mid-traffic. Then every reward that was not
acknowledged is retried through a surviving replica (it must come back applied or
"duplicate", or NOT_FOUND for a decision a SIGKILL took back within the flush interval,
ADR 0011), and a fresh NatsStore checks, user by user, that the model's `rewarded`
(summed over arms) equals the number of distinct decisions rewarded: no acknowledged
reward lost, none applied twice.

With OO_FAULT_REPORT set, each test appends its counts to that JSON lines file;
`scripts/fault_table.py` renders docs/faults.md from it (`make faults`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import nats.js.errors
import pytest

from oo.scoring.v1 import scoring_pb2 as pb
from oo_ml.domain.rng import decision_time
from oo_ml.errors import TransientStoreError
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.nats import kv as kvs
from oo_ml.stores.nats.profiles import NatsProfileStore
from oo_ml.stores.nats.scoring import NatsStore
from tests import natscluster
from tests.conftest import oo_ml_bin
from tests.natscluster import Replica, Topology, single_node, three_nodes

POLICY = "egreedy-v2"
GREEDY = {"OO_POLICY": POLICY, "OO_EPSILON": "0", "OO_MIN_EXPLORATION": "0"}
FLUSH_MS = 5.0
CANDIDATES = [pb.Candidate(tip_id=t) for t in ("walk", "read", "call")]
USERS = [f"u{i}" for i in range(12)]
SCORE_DEADLINE_S = 2.0
REWARD_DEADLINE_S = 3.0
# Outcomes a Reward may have while a fault is on: anything else fails the test.
REFUSED = {
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
}


@dataclass
class Decision:
    decision_id: str
    user: str
    replica: int
    answered_at: float
    first: str = ""  # the Reward's outcome under traffic
    final: str = ""  # after the retries


@dataclass
class Run:
    """What the clients saw; `fault` is the window the fault was on."""

    scenario: str
    replicas: list[Replica]
    alive: list[int]
    decisions: list[Decision] = field(default_factory=list)
    scores: Counter[str] = field(default_factory=Counter)
    fault_start: float = float("inf")
    fault_end: float = float("inf")
    killed: dict[int, float] = field(default_factory=dict)  # replica -> when
    score_errors: Counter[str] = field(default_factory=Counter)  # on live replicas

    def during_fault(self, t: float) -> bool:
        return self.fault_start <= t <= self.fault_end


async def start_replicas(topology: Topology, root: Path, n: int) -> list[Replica]:
    env = {**GREEDY, "OO_DECISION_FLUSH_MS": str(FLUSH_MS)}
    return await natscluster.start_replicas(oo_ml_bin(), topology, root, n, **env)


def outcome(err: grpc.aio.AioRpcError) -> str:
    return REFUSED.get(err.code(), err.code().name.lower())


async def reward(replica: Replica, decision_id: str, deadline: float) -> str:
    try:
        done = await replica.stub.Reward(
            pb.RewardRequest(decision_id=decision_id, reward=1.0), timeout=deadline
        )
    except grpc.aio.AioRpcError as e:
        return outcome(e)
    return "applied" if done.applied else "duplicate"


async def score(run: Run, at: int, user: str, keep: bool = True) -> Decision | None:
    t0 = time.monotonic()
    try:
        resp = await run.replicas[at].stub.Score(
            pb.ScoreRequest(user_id=user, candidates=CANDIDATES), timeout=SCORE_DEADLINE_S
        )
    except grpc.aio.AioRpcError as e:
        run.scores[("fault_" if run.during_fault(t0) else "") + "failed"] += 1
        if at in run.alive:
            run.score_errors[e.code().name] += 1
        return None
    run.scores[("fault_" if run.during_fault(t0) else "") + "answered"] += 1
    d = Decision(resp.decision_id, user, at, time.time())
    if keep:  # a probe's decisions are not rewarded
        run.decisions.append(d)
    return d


async def client(run: Run, user: str, k: int, stop: asyncio.Event) -> None:
    """Score on one live replica, then Reward that decision on the next one, until stop."""
    while not stop.is_set():
        k += 1
        alive = list(run.alive)
        d = await score(run, alive[k % len(alive)], user)
        if d is None:
            await asyncio.sleep(0.05)
            continue
        to = alive[(k + 1) % len(alive)]
        d.first = await reward(run.replicas[to], d.decision_id, REWARD_DEADLINE_S)
        if d.first in REFUSED.values():
            await asyncio.sleep(0.05)  # a client backs off a little


async def prober(run: Run, user: str, stop: asyncio.Event) -> None:
    """Score only, every 20 ms, on each live replica in turn: Score's availability."""
    k = 0
    while not stop.is_set():
        k += 1
        alive = list(run.alive)
        await score(run, alive[k % len(alive)], user, keep=False)
        await asyncio.sleep(0.02)


async def warm(run: Run) -> None:
    """Each user's model in every replica's cache, with a reward or two learned."""
    for user in USERS:
        for i in run.alive:
            d = await score(run, i, user)
            assert d is not None
        for d in run.decisions[-len(run.alive) :]:
            d.first = await reward(run.replicas[d.replica], d.decision_id, 10.0)
            assert d.first == "applied"


async def settle(run: Run, topology: Topology) -> Counter[str]:
    """Retry every unacknowledged reward through a survivor, then check the store."""
    survivor = run.replicas[run.alive[0]]
    retried: Counter[str] = Counter()
    for d in run.decisions:
        if d.first in ("applied", "duplicate"):
            d.final = d.first
            continue
        # A decision not found is UNAVAILABLE for 30 s from its making (its replica may
        # be retrying the flush), NOT_FOUND after: retry until one answer is final.
        made = decision_time(d.decision_id) or time.time()
        while True:
            d.final = await reward(survivor, d.decision_id, 10.0)
            if d.final not in REFUSED.values() or time.time() > made + 40:
                break
            await asyncio.sleep(0.5)
        retried[d.final] += 1
    # A decision lost (NOT_FOUND) only if a SIGKILL took it within the flush interval.
    for d in run.decisions:
        assert d.final in ("applied", "duplicate", "not_found"), (d, d.final)
        if d.final == "not_found":
            killed_at = run.killed.get(d.replica)
            made = decision_time(d.decision_id)
            assert killed_at is not None and made is not None, f"{d} lost without a kill"
            # The flush interval, plus the time the writer's commit takes on two busy cores.
            assert killed_at - made <= FLUSH_MS / 1000 + 0.5, (
                f"{d.decision_id} lost {killed_at - made:.3f}s before the kill"
            )
    # A fresh store: each user's model learned exactly the distinct decisions rewarded.
    nc = await nats.connect(servers=topology.url.split(","))
    try:
        store = await NatsStore.open(nc, replicas=topology.replicas)
        per_user: Counter[str] = Counter()
        for d in run.decisions:
            if d.final in ("applied", "duplicate"):
                per_user[d.user] += 1
                stored = await store.get_decision(d.decision_id)
                assert stored is not None and stored.reward.reward == 1.0, d
        for user in USERS:
            found = await store.get(user, POLICY)
            learned = sum(a.rewarded for a in found.state.arms.values()) if found else 0
            assert learned == per_user[user], (
                f"{user}: the model learned {learned} rewards, {per_user[user]} decisions"
                " were rewarded (less: an acknowledged reward lost; more: one applied twice)"
            )
    finally:
        await nc.close()
    return retried


def write_row(run: Run, retried: Counter[str], topology: Topology) -> dict[str, object]:
    first = Counter(d.first for d in run.decisions)
    acked = {d.decision_id for d in run.decisions if d.first == "applied"}
    kept = {d.decision_id for d in run.decisions if d.final in ("applied", "duplicate")}
    row: dict[str, object] = {
        "scenario": run.scenario,
        "nodes": len(topology.nodes),
        "replicas": len(run.replicas),
        "scores_answered": run.scores["answered"] + run.scores["fault_answered"],
        "scores_answered_during_fault": run.scores["fault_answered"],
        "scores_failed_during_fault": run.scores["fault_failed"],
        "rewards_acked": len(acked),
        "rewards_duplicate": first["duplicate"],
        "rewards_refused_unavailable": first["unavailable"],
        "rewards_refused_deadline": first["deadline"],
        "rewards_not_found": first["not_found"],
        "rewards_other": sum(
            n
            for k, n in first.items()
            if k not in ("applied", "duplicate", "unavailable", "deadline", "not_found")
        ),
        "retried": sum(retried.values()),
        "retried_applied": retried["applied"],
        "retried_duplicate": retried["duplicate"],
        "decisions_lost": sum(1 for d in run.decisions if d.final == "not_found"),
        "acked_rewards_lost": len(acked - kept),
        "applied_twice": 0,  # settle() asserted the models learned each decision once
    }
    print(run.scenario, dict(first), dict(run.score_errors))
    path = os.environ.get("OO_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


async def traffic(run: Run, per_user: int = 1) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(client(run, user, i * 7 + j, stop))
        for i, user in enumerate(USERS)
        for j in range(per_user)
    ]
    tasks += [asyncio.create_task(prober(run, user, stop)) for user in USERS[:4]]
    return stop, tasks


async def close_all(run: Run) -> None:
    for i in run.alive:
        await run.replicas[i].close()


async def test_nats_server_restarted_mid_traffic(tmp_path: Path) -> None:
    """One nats-server, stopped (SIGTERM) and started again on its ports and store while
    two replicas serve: Score answers warm users from the caches meanwhile, Reward says
    UNAVAILABLE or runs out its deadline (never a silent loss), the replicas reconnect."""
    async with single_node(tmp_path / "nats") as topology:
        replicas = await start_replicas(topology, tmp_path, 2)
        run = Run("nats-server restarted (1 node)", replicas, [0, 1])
        try:
            await warm(run)
            stop, tasks = await traffic(run)
            await asyncio.sleep(1.0)
            node = topology.nodes[0]
            run.fault_start = time.monotonic()
            await asyncio.to_thread(node.stop)
            await asyncio.sleep(2.0)
            node.start()
            await topology.ready()
            run.fault_end = time.monotonic()
            await asyncio.sleep(2.0)  # traffic again, once the replicas are back
            stop.set()
            await asyncio.gather(*tasks)
            assert run.scores["fault_answered"] > 0
            assert run.scores["fault_failed"] == 0, "a warm user's Score needed the broker"
            retried = await settle(run, topology)
            # The replicas reconnected: both take rewards again.
            for r in replicas:
                d = await score(run, replicas.index(r), USERS[0], keep=False)
                assert d is not None
                assert await reward(r, d.decision_id, 10.0) == "applied"
            row = write_row(run, retried, topology)
            assert row["rewards_other"] == row["rewards_not_found"] == 0
            assert row["rewards_refused_unavailable"] + row["rewards_refused_deadline"] > 0
        finally:
            await close_all(run)


async def test_replica_killed_mid_batch(tmp_path: Path) -> None:
    """Two replicas; a batch of concurrent rewards in flight through one when it is
    SIGKILLed, with traffic going on through both."""
    async with single_node(tmp_path / "nats") as topology:
        replicas = await start_replicas(topology, tmp_path, 2)
        run = Run("replica killed -9 mid-batch (2 replicas)", replicas, [0, 1])
        try:
            await warm(run)
            stop, tasks = await traffic(run)
            await asyncio.sleep(0.5)
            # The batch: decisions of every user on both replicas, rewarded through r1.
            batch = [
                d
                for d in await asyncio.gather(
                    *(score(run, i % 2, USERS[i % len(USERS)]) for i in range(240))
                )
                if d is not None
            ]
            victim = replicas[1]

            async def through_victim(d: Decision) -> None:
                d.first = await reward(victim, d.decision_id, REWARD_DEADLINE_S)

            inflight = [asyncio.create_task(through_victim(d)) for d in batch]
            # Mid-batch: once some rewards of the batch have been answered (not after a
            # fixed time, which a loaded machine may not keep).
            deadline = time.monotonic() + 10
            while sum(d.first == "applied" for d in batch) < 10:
                assert time.monotonic() < deadline, "no reward of the batch was answered"
                await asyncio.sleep(0.005)
            run.alive = [0]
            run.fault_start = time.monotonic()
            run.killed[1] = time.time()
            victim.kill()
            await asyncio.gather(*inflight)
            await asyncio.sleep(1.0)  # the survivor carries on alone
            run.fault_end = time.monotonic()
            stop.set()
            await asyncio.gather(*tasks)
            answered = Counter(d.first for d in batch)
            assert answered["applied"] > 0, "the kill came before any reward of the batch"
            assert answered["unavailable"] > 0, "the kill came after the whole batch"
            retried = await settle(run, topology)
            write_row(run, retried, topology)
        finally:
            await close_all(run)


async def test_one_node_of_three_stopped_under_traffic(tmp_path: Path) -> None:
    """A three-node cluster (every bucket and stream at R3): one node stopped while two
    replicas, given every node's URL, serve; they fail over to the two left."""
    async with three_nodes(tmp_path / "nats") as topology:
        replicas = await start_replicas(topology, tmp_path, 2)
        run = Run("1 of 3 nodes stopped (R3)", replicas, [0, 1])
        try:
            await warm(run)
            stop, tasks = await traffic(run)
            await asyncio.sleep(1.0)
            run.fault_start = time.monotonic()
            await asyncio.to_thread(topology.nodes[0].stop)
            await asyncio.sleep(3.0)
            run.fault_end = time.monotonic()
            stop.set()
            await asyncio.gather(*tasks)
            retried = await settle(run, topology)
            row = write_row(run, retried, topology)
            assert row["rewards_other"] == 0
            assert run.scores["fault_answered"] > 0
        finally:
            await close_all(run)


async def test_a_replica_started_before_the_cluster_has_quorum_waits_for_it(
    tmp_path: Path,
) -> None:
    """Two of three nodes down when a replica starts: JetStream cannot create an R3 bucket
    (no meta leader), so the store's set-up retries until the nodes are back instead of
    failing the start. Not in the fault table: nothing is served meanwhile."""
    async with three_nodes(tmp_path / "nats") as topology:
        for node in topology.nodes[1:]:
            await asyncio.to_thread(node.stop)
        nc = await nats.connect(topology.nodes[0].url)
        try:
            opening = asyncio.create_task(NatsStore.open(nc, replicas=3))
            await asyncio.sleep(3.0)
            assert not opening.done(), "the store opened without a quorum"
            for node in topology.nodes[1:]:
                node.start()
            store = await asyncio.wait_for(opening, 60)
            assert await store.get("nobody", "egreedy-v2") is None
            info = await store.js.stream_info("OO_DECISIONS")
            assert info.config.num_replicas == 3
        finally:
            await nc.close()


async def test_a_placement_refusal_is_waited_out_then_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While nodes are down or (re)joining, a meta leader may answer but refuse to place an
    R3 bucket: "no suitable peers for placement", a 400. Set-up must wait that out like any
    not-ready answer, never read the 400 as "another replica created it". Five replicas on
    three nodes is that refusal made permanent: set-up retries for its window, then fails
    with the server's own reason (what an operator sees when OO_NATS_REPLICAS exceeds the
    cluster)."""
    monkeypatch.setattr(kvs, "SETUP_WITHIN_S", 2.0)
    async with three_nodes(tmp_path / "nats") as topology:
        nc = await nats.connect(topology.nodes[0].url)
        try:
            started = time.monotonic()
            with pytest.raises(nats.js.errors.BadRequestError) as refused:
                await NatsStore.open(nc, replicas=5)
            assert refused.value.err_code == kvs.NO_PEERS
            elapsed = time.monotonic() - started
            retries = [r for r in caplog.records if "JetStream not ready" in r.getMessage()]
            assert len(retries) >= 2
            # It slept every pause it logged (how many fit in the window depends on how
            # long each refused call took, so the pauses, not the clock, are the measure).
            paused = sum(
                float(re.findall(r"retrying in ([0-9.]+) s", r.getMessage())[0]) for r in retries
            )
            assert paused >= 0.75 and elapsed >= paused
            assert "no suitable peers" in retries[0].getMessage()
            # The profile store's index stream too (its bucket found, made with 3).
            profiles = NatsProfileStore(nc, 600.0, ALL_FEATURES, replicas=5)
            await kvs.ensure_bucket(profiles.js, profiles.bucket, replicas=3)
            with pytest.raises(TransientStoreError, match="no suitable peers"):
                await profiles.ensure_schema()
        finally:
            await nc.close()

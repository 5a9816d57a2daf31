"""One suite for both `Store`s: SQLite (a real file) and JetStream (a real nats-server).

Every test here runs against each store, so the engine can rely on the same behaviour
whichever `OO_STATE` is set. NATS-only guarantees (two processes on one broker, a reward
replayed after a crash, the change feed) are at the end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import numpy as np
import pytest

from oo_ml.config import ScoringConfig
from oo_ml.domain.decisions import DecisionRecord, LoggedCandidate, ShadowView
from oo_ml.domain.engine.models import Models
from oo_ml.domain.policies import build_policies
from oo_ml.domain.ports import (
    AddOffPolicy,
    AttachShadows,
    Change,
    GenerationRecord,
    InsertDecision,
    MarkRewarded,
    PutState,
    Store,
)
from oo_ml.domain.state import PolicyState
from oo_ml.errors import Conflict, TransientStoreError
from oo_ml.ingest.nats_server import LocalNatsServer
from oo_ml.stores.nats.scoring import NatsStore
from oo_ml.stores.sqlite.scoring import SqliteStore


def st(decisions: int) -> PolicyState:
    return PolicyState("p", "v1", 7, 1.0, decisions=decisions)


def rec(
    i: int, user: str = "u", arm: str = "a", prompt: str = "", at: float = 100.0
) -> DecisionRecord:
    return DecisionRecord(
        decision_id=f"{i:032x}",
        user_id=user,
        policy="p",
        feature_version="v1",
        x=np.arange(7, dtype=np.float64) / 7,
        candidates=(
            LoggedCandidate("t1", arm, 0.5, 0.75, "", prompt),
            LoggedCandidate("t2", "other", 0.25, 0.25),
        ),
        chosen_index=0,
        explored=False,
        created_at=at + i,
    )


@pytest.fixture
async def nats_url(tmp_path: Path) -> AsyncIterator[str]:
    server = LocalNatsServer(tmp_path / "nats")
    url = await server.start()
    yield url
    await server.stop()


async def open_nats(url: str) -> tuple[NatsStore, nats.NATS]:
    nc = await nats.connect(url)
    return await NatsStore.open(nc, retention_s=3600.0, log_max_mb=64.0), nc


@pytest.fixture(params=["sqlite", "sqlite-process", "nats"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param.startswith("sqlite"):
        # sqlite-process: the decision log's batches (decisions and shadow views alone)
        # go to the child process, as under `oo-ml serve`; other commits to the thread.
        writer = "process" if request.param == "sqlite-process" else "thread"
        s = SqliteStore.open(tmp_path / "s.db", decision_writer=writer)
        yield s
        await s.close()
        return
    server = LocalNatsServer(tmp_path / "nats")
    url = await server.start()
    ns, nc = await open_nats(url)
    yield ns
    await ns.close()
    await nc.close()
    await server.stop()


async def test_compare_and_set_moves_on_revisions(store: Store) -> None:
    assert await store.get("u", "p") is None
    r1 = await store.compare_and_set("u", "p", 0, st(1))
    assert r1 is not None and r1 > 0
    assert await store.compare_and_set("u", "p", 0, st(2)) is None  # exists already
    r2 = await store.compare_and_set("u", "p", r1, st(3))
    assert r2 is not None and r2 > r1
    assert await store.compare_and_set("u", "p", r1, st(4)) is None  # stale revision
    got = await store.get("u", "p")
    assert got is not None and (got.revision, got.state) == (r2, st(3))


async def test_concurrent_writers_of_one_model_one_wins(store: Store) -> None:
    r1 = await store.compare_and_set("u", "p", 0, st(0))
    assert r1 is not None
    wins = await asyncio.gather(
        *(store.compare_and_set("u", "p", r1, st(10 + i)) for i in range(20))
    )
    assert sum(w is not None for w in wins) == 1


async def test_a_logged_decision_reads_back_with_its_shadows(store: Store) -> None:
    r = rec(1, prompt="v2")
    view = ShadowView("lints", "a", 0.5, (0.5, 0.5), (0.25, 0.5))
    await store.commit(
        [InsertDecision(r), AttachShadows(r.decision_id, (view,), {"v2": np.ones(12)})]
    )
    got = await store.get_decision(r.decision_id)
    assert got is not None and got.reward.reward is None
    assert got.record.user_id == "u" and got.record.policy == "p"
    assert got.record.created_at == r.created_at and got.record.chosen.arm == "a"
    assert got.record.chosen.prompt_version == "v2"
    assert np.allclose(got.record.x, r.x, atol=1e-6)
    assert got.record.shadows == (view,)
    assert np.allclose(got.record.shadow_vectors["v2"], np.ones(12))
    assert await store.get_decision(f"{999:032x}") is None


async def test_a_decision_is_rewarded_once(store: Store) -> None:
    r = rec(1)
    await store.commit([InsertDecision(r)])
    await store.commit([MarkRewarded(r.decision_id, 1.0, 200.0, "explicit")])
    with pytest.raises(Conflict):
        await store.commit([MarkRewarded(r.decision_id, 0.0, 201.0, "explicit")])
    got = await store.get_decision(r.decision_id)
    assert got is not None
    assert (got.reward.reward, got.reward.rewarded_at, got.reward.source) == (
        1.0,
        200.0,
        "explicit",
    )


async def test_a_reward_and_its_model_land_together(store: Store) -> None:
    r = rec(1)
    await store.commit([InsertDecision(r)])
    revs = await store.commit(
        [MarkRewarded(r.decision_id, 1.0, 200.0, "explicit"), PutState("u", "p", 0, st(7))]
    )
    stored = await store.get("u", "p")
    assert stored is not None and stored.state == st(7) and revs[("u", "p")] == stored.revision


async def test_pulls_pending_and_totals_count_the_log(store: Store) -> None:
    await store.commit(
        [
            InsertDecision(rec(1, arm="a")),
            InsertDecision(rec(2, arm="a")),
            InsertDecision(rec(3, arm="b", prompt="v1")),
            InsertDecision(rec(4, user="w", arm="b")),
        ]
    )
    await store.commit([MarkRewarded(rec(1).decision_id, 1.0, 200.0, "explicit")])
    await store.commit([MarkRewarded(rec(3).decision_id, 0.5, 200.0, "explicit")])
    assert await store.pulls("u", "p") == {"a": 2, "b": 1}
    assert await store.pending_count("u", "p") == 1
    assert await store.pending_count("w", "p") == 1
    totals = await store.policy_totals("p")
    assert totals.users == 2 and totals.pending == 2
    assert [(a.arm, a.pulls, a.rewarded, a.reward_sum) for a in totals.arms] == [
        ("a", 2, 1, 1.0),
        ("b", 2, 1, 0.5),
    ]
    for user in ("u", None):
        (prompt,) = await store.prompt_totals("p", user)
        assert (prompt.prompt_version, prompt.served, prompt.rewarded, prompt.reward_sum) == (
            "v1",
            1,
            1,
            0.5,
        )


async def test_a_large_group_commit_lands_every_decision_in_order(store: Store) -> None:
    """One commit of 1,100 decisions, as the decision log makes after a stall (the SQLite
    store inserts runs of them by multi-row statements of several sizes), with a shadow
    view between them: every decision reads back, every pull is counted, and the view
    lands beside its decision."""
    users, arms = ("u", "v", "w"), ("a", "b", "c", "d")
    first = [rec(i, user=users[i % 3], arm=arms[i % 4]) for i in range(600)]
    second = [rec(i, user=users[i % 3], arm=arms[i % 4]) for i in range(600, 1100)]
    view = ShadowView("lints", "a", 0.5, (0.5, 0.5), (0.25, 0.5))
    await store.commit(
        [
            *(InsertDecision(r) for r in first),
            AttachShadows(first[5].decision_id, (view,), {"v1": np.ones(7)}),
            *(InsertDecision(r) for r in second),
        ]
    )
    for r in (*first, *second)[::37]:
        got = await store.get_decision(r.decision_id)
        assert got is not None and got.record.created_at == r.created_at
        assert got.record.user_id == r.user_id and got.record.chosen.arm == r.chosen.arm
    last = await store.get_decision(second[-1].decision_id)
    assert last is not None and last.record.user_id == second[-1].user_id
    shadowed = await store.get_decision(first[5].decision_id)
    assert shadowed is not None and shadowed.record.shadows == (view,)
    for u, user in enumerate(users):
        expected = {
            arm: sum(1 for i in range(1100) if i % 3 == u and i % 4 == a)
            for a, arm in enumerate(arms)
        }
        assert await store.pulls(user, "p") == expected
    # And pulls add to what a table already holds.
    await store.commit([InsertDecision(rec(5000, user="u", arm="a"))])
    assert (await store.pulls("u", "p"))["a"] == 93


async def test_off_policy_sums_add_up(store: Store) -> None:
    for i, (w, r) in enumerate(((2.0, 1.0), (0.5, 0.0))):
        d = rec(i)
        await store.commit([InsertDecision(d)])
        await store.commit(
            [MarkRewarded(d.decision_id, r, 200.0, "explicit"), AddOffPolicy("p", "s", w, r, w * r)]
        )
    (t,) = await store.off_policy_totals("p")
    assert (t.shadow, t.n, t.sq_n) == ("s", 2, 2)
    assert (t.weight_sum, t.weighted_reward_sum, t.dr_sum, t.reward_sum) == (2.5, 2.0, 2.0, 1.0)
    assert (t.weight_sq_sum, t.weight_sq_reward_sum) == (4.25, 4.0)


async def test_a_reset_forgets_models_and_pending_decisions(store: Store) -> None:
    done, pending = rec(1), rec(2)
    await store.commit([InsertDecision(done), InsertDecision(pending)])
    await store.commit(
        [MarkRewarded(done.decision_id, 1.0, 200.0, "explicit"), PutState("u", "p", 0, st(1))]
    )
    assert await store.reset_user("u") == (1, 1)
    assert await store.get("u", "p") is None
    assert await store.get_decision(pending.decision_id) is None
    assert await store.pulls("u", "p") == {}
    assert await store.pending_count("u", "p") == 0


async def test_revisions_keep_growing_across_a_reset(store: Store) -> None:
    """A model created again after a reset starts above the revisions the old one had:
    a process still holding the pre-reset model at revision R (its feed not caught up)
    cannot win a compare-and-set against the new model once that reaches R."""
    r1 = await store.compare_and_set("u", "p", 0, st(1))
    assert r1 is not None
    stale = await store.compare_and_set("u", "p", r1, st(2))  # the pre-reset model
    assert stale is not None
    await store.reset_user("u")
    n1 = await store.compare_and_set("u", "p", 0, st(10))
    assert n1 is not None and n1 > stale
    n2 = await store.compare_and_set("u", "p", n1, st(11))
    assert n2 is not None and n2 > n1
    assert await store.compare_and_set("u", "p", stale, st(3)) is None
    got = await store.get("u", "p")
    assert got is not None and got.state == st(11)


async def test_the_sweeper_finds_old_unrewarded_decisions(store: Store) -> None:
    await store.commit([InsertDecision(rec(i, at=1000.0)) for i in range(5)])
    await store.commit([MarkRewarded(rec(1).decision_id, 1.0, 2000.0, "explicit")])
    due = await store.pending_before(1003.5, 10)  # made at 1000..1004
    assert sorted(due) == [rec(i).decision_id for i in (0, 2, 3)]


async def test_a_decision_the_sweep_could_not_reward_is_found_again(store: Store) -> None:
    """The sweep's answer is not a promise to reward: until a reward lands, the decision
    stays due (NATS keeps a shared position; it must not move past it). Decisions of a
    reset user are no longer due."""
    await store.commit([InsertDecision(rec(i, at=1000.0)) for i in range(4)])
    await store.commit([InsertDecision(rec(4, user="gone", at=1000.0))])
    ids = [rec(i).decision_id for i in range(5)]
    assert sorted(await store.pending_before(1010.0, 10)) == ids
    # Only the first decision's default reward landed (the store went away for the rest).
    await store.commit([MarkRewarded(ids[0], 0.0, 2000.0, "default")])
    await store.reset_user("gone")
    assert sorted(await store.pending_before(1010.0, 10)) == ids[1:4]
    assert sorted(await store.pending_before(1010.0, 10)) == ids[1:4]


async def test_generations_are_found_by_id(store: Store) -> None:
    g = GenerationRecord("gen-1", "u", "v3", "m", False, 123.0)
    await store.record_generation(g)
    assert await store.generations(["gen-1", "gen-2"]) == {"gen-1": g}


async def test_policy_states_are_the_latest_models(store: Store) -> None:
    for i in range(5):
        await store.compare_and_set(f"u{i}", "p", 0, st(i))
    states = await store.policy_states("p", 3)
    assert len(states) == 3 and {s.decisions for s in states} <= set(range(5))


# -- JetStream only: several processes on one broker ------------------------------------


async def test_a_flush_retried_after_its_ledger_failed_still_counts_its_decisions(
    nats_url: str,
) -> None:
    """A flush whose decisions landed but whose ledger step failed is retried whole; the
    retry finds the decisions duplicates and must still write their counts, once."""
    store, nc = await open_nats(nats_url)
    real = store.js.publish_async
    failed: list[str] = []

    async def ledger_down(subject: str, *args: object, **kw: object) -> object:
        if subject.startswith("oo.ledger.") and not failed:
            failed.append(subject)
            raise nats.errors.TimeoutError
        return await real(subject, *args, **kw)  # type: ignore[arg-type]

    store.js.publish_async = ledger_down  # type: ignore[method-assign]
    batch = [InsertDecision(rec(i, arm="a" if i < 2 else "b")) for i in range(3)]
    with pytest.raises(TransientStoreError):
        await store.commit(batch)
    assert failed
    await store.commit(batch)  # the decision log's retry
    await store.commit(batch)  # and a second one, which must not count again
    store.js.publish_async = real  # type: ignore[method-assign]
    assert await store.pulls("u", "p") == {"a": 2, "b": 1}
    assert await store.pending_count("u", "p") == 3
    totals = await store.policy_totals("p")
    assert {(t.arm, t.pulls) for t in totals.arms} == {("a", 2), ("b", 1)}
    await store.close()
    await nc.close()


async def test_policy_totals_while_the_broker_is_away_are_transient(tmp_path: Path) -> None:
    """Stats reads the tallies and the ledger: with the broker gone that is a retryable
    TransientStoreError (UNAVAILABLE at the edge), not a raw NATS error (INTERNAL)."""
    server = LocalNatsServer(tmp_path / "nats")
    store, nc = await open_nats(await server.start())
    await store.commit([InsertDecision(rec(1))])
    store._tally_dirty = True  # a count not written yet: Stats writes it first
    await server.stop()
    with pytest.raises(TransientStoreError):
        await asyncio.wait_for(store.policy_totals("p"), 30)
    with contextlib.suppress(OSError):  # closing a connection whose broker is gone
        await nc.close()


async def crash_between_model_and_mark(store: NatsStore, r: DecisionRecord) -> None:
    """Log `r`, give "u" a model, then reward `r` with the process dying after the
    model's CAS and before the decision's mark (the mark's publish fails)."""
    await store.commit([InsertDecision(r)])
    rev = await store.compare_and_set("u", "p", 0, st(0))
    assert rev is not None
    real_publish = store.js.publish

    async def crash(subject: str, *args: object, **kw: object) -> object:
        if subject.endswith(".r." + r.decision_id):
            raise ConnectionError("killed")
        return await real_publish(subject, *args, **kw)  # type: ignore[arg-type]

    store.js.publish = crash  # type: ignore[method-assign]
    writes = [MarkRewarded(r.decision_id, 1.0, 200.0, "explicit"), PutState("u", "p", rev, st(1))]
    try:
        with pytest.raises(Exception, match="killed"):
            await store.commit(writes)
    finally:
        store.js.publish = real_publish  # type: ignore[method-assign]


async def test_a_reward_replayed_after_a_crash_is_not_learned_twice(nats_url: str) -> None:
    """The crash window between a model's CAS and the decision's mark: the model has
    learned the reward, the decision looks pending. The replay must not teach it again."""
    store, nc = await open_nats(nats_url)
    r = rec(1)
    # The first attempt: the model's CAS lands, then the process dies before the mark.
    await crash_between_model_and_mark(store, r)
    taught = await store.get("u", "p")
    assert taught is not None and taught.state == st(1)
    got = await store.get_decision(r.decision_id)
    assert got is not None and got.reward.reward is None  # looks pending
    # The retry, computed from the taught model: the model is skipped, the mark written.
    revs = await store.commit(
        [
            MarkRewarded(r.decision_id, 1.0, 200.0, "explicit"),
            PutState("u", "p", taught.revision, st(2)),
        ]
    )
    assert ("u", "p") not in revs
    after = await store.get("u", "p")
    assert after is not None and after.state == st(1)  # learned once
    got = await store.get_decision(r.decision_id)
    assert got is not None and got.reward.reward == 1.0
    await nc.close()


async def test_a_crashed_reward_is_remembered_past_many_later_rewards(nats_url: str) -> None:
    """The same crash window, then 100 more rewards of the model (more than its header's
    64 ids) before the sweeper's default reward of the crashed decision a day later: the
    model still remembers it (ids whose marks are written make room), so it is not
    taught twice."""
    store, nc = await open_nats(nats_url)
    r = rec(1)
    await crash_between_model_and_mark(store, r)
    later = [rec(100 + i) for i in range(100)]
    await store.commit([InsertDecision(d) for d in later])
    for i, d in enumerate(later):
        current = await store.get("u", "p")
        assert current is not None
        revs = await store.commit(
            [
                MarkRewarded(d.decision_id, 1.0, 300.0, "explicit"),
                PutState("u", "p", current.revision, st(2 + i)),
            ]
        )
        assert ("u", "p") in revs
    taught = await store.get("u", "p")
    assert taught is not None and taught.state == st(101)
    revs = await store.commit(
        [
            MarkRewarded(r.decision_id, 0.0, 90000.0, "default"),
            PutState("u", "p", taught.revision, st(999)),
        ]
    )
    assert ("u", "p") not in revs  # remembered: not taught again
    after = await store.get("u", "p")
    assert after is not None and after.state == st(101)
    got = await store.get_decision(r.decision_id)
    assert got is not None and got.reward.source == "default"
    await nc.close()


async def test_two_processes_share_models_decisions_and_rewards(nats_url: str) -> None:
    a, nca = await open_nats(nats_url)
    b, ncb = await open_nats(nats_url)
    r = rec(1)
    await a.commit([InsertDecision(r)])
    assert (await b.get_decision(r.decision_id)) is not None  # logged by A, found by B
    await b.commit(
        [MarkRewarded(r.decision_id, 1.0, 200.0, "explicit"), PutState("u", "p", 0, st(5))]
    )
    got = await a.get("u", "p")
    assert got is not None and got.state == st(5)
    with pytest.raises(Conflict):  # A cannot reward it again
        await a.commit([MarkRewarded(r.decision_id, 0.0, 201.0, "explicit")])
    # Policy totals add every process's tally up.
    await a.commit([InsertDecision(rec(2, arm="b"))])
    totals = await b.policy_totals("p")
    assert {(t.arm, t.pulls, t.rewarded) for t in totals.arms} == {("a", 1, 1), ("b", 1, 0)}
    await a.close()
    await b.close()
    await nca.close()
    await ncb.close()


async def test_the_change_feed_keeps_another_process_cache_fresh(nats_url: str) -> None:
    a, nca = await open_nats(nats_url)
    b, ncb = await open_nats(nats_url)
    policies = build_policies(ScoringConfig())
    models = Models(b, ScoringConfig())
    stop = asyncio.Event()
    seen: list[Change] = []

    def apply(changes: list[Change]) -> None:  # type: ignore[type-arg]
        seen.extend(changes)
        models.apply(changes)

    feed = b.change_feed(lambda u, p: models.cached(u, p) is not None)
    task = asyncio.create_task(feed.follow(apply, stop))
    for _ in range(100):  # subscribed: it says so with an "everything may have changed"
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen and seen[0].user_id == ""
    # B caches u's linucb model (none yet: revision 0).
    rev0, _ = await models.load("u", policies["linucb"])
    assert rev0 == 0 and models.cached("u", "linucb") is not None
    fresh = PolicyState("linucb", "v2", 12, 1.0, decisions=42)
    rev = await a.compare_and_set("u", "linucb", 0, fresh)
    assert rev is not None
    for _ in range(200):
        cached = models.cached("u", "linucb")
        if cached is not None and cached[0] == rev:
            break
        await asyncio.sleep(0.01)
    cached = models.cached("u", "linucb")
    assert cached is not None and cached[0] == rev and cached[1].decisions == 42
    # A reset through A empties B's entry.
    await a.reset_user("u")
    for _ in range(200):
        if models.cached("u", "linucb") is None:
            break
        await asyncio.sleep(0.01)
    assert models.cached("u", "linucb") is None
    stop.set()
    await task
    for s, nc in ((a, nca), (b, ncb)):
        await s.close()
        await nc.close()


async def test_a_stopped_process_tally_is_folded_once_and_still_counted(nats_url: str) -> None:
    a, nca = await open_nats(nats_url)
    b, ncb = await open_nats(nats_url)
    await a.commit([InsertDecision(rec(1, arm="x")), InsertDecision(rec(2, arm="x"))])
    await b.commit([InsertDecision(rec(3, arm="x"))])
    await a.close()  # folds a's tally into the archive and deletes a's key
    await a.close()  # a retried fold (same instance) adds nothing
    keys = await b._keys("oo_tallies", "*")
    assert a.instance not in keys and "archive" in keys
    (arm,) = (await b.policy_totals("p")).arms
    assert (arm.arm, arm.pulls) == ("x", 3)
    await b.close()
    for nc in (nca, ncb):
        await nc.close()

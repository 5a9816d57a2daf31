"""Does it learn? Checked against the engine with seeded decision ids (so every run is the
same run) and over gRPC (where the server draws its own ids, so the threshold carries a
margin computed from the binomial spread), on synthetic users whose best arm depends on
the hour of day (four 6-hour blocks, one best arm each)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from oo.scoring.v1 import scoring_pb2 as pb
from oo_ml import config as config_mod
from oo_ml.domain.engine import Candidate, ScoreCommand, ScoringEngine
from oo_ml.domain.features import Inputs, NoStoredFeatures
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.sqlite.scoring import SqliteStore
from tests.conftest import Running

ARMS = ["focus", "break", "plan", "review"]
ROUNDS, LAST = 1000, 200
# What the engine test below requires, on seeded ids, of egreedy's greedy choice on this
# world after ROUNDS rounds.
GREEDY_ACCURACY = 0.95


def best_arm(hour: int) -> str:
    return ARMS[hour // 6]


def reward_for(arm: str, hour: int, rnd: random.Random) -> float:
    # Noisy: the best arm pays 80% of the time, the others 20%.
    return 1.0 if rnd.random() < (0.8 if arm == best_arm(hour) else 0.2) else 0.0


def engine_on(path: Path, seed: int) -> tuple[ScoringEngine, SqliteStore]:
    store = SqliteStore.open(path)
    counter = itertools.count()
    engine = ScoringEngine(
        config_mod.load(env={}).scoring,
        store,
        NoStoredFeatures(),
        ALL_FEATURES,
        decision_ids=lambda: f"seed{seed}-{next(counter)}",
    )
    return engine, store


async def test_egreedy_learns_the_hour_dependent_best_arm(tmp_path: Path) -> None:
    engine, store = engine_on(tmp_path / "learn.db", seed=1)
    rnd = random.Random(2026)
    cands = tuple(Candidate(f"tip-{a}", a) for a in ARMS)
    greedy_hits: list[bool] = []
    try:
        for _ in range(ROUNDS):
            hour = rnd.randrange(24)
            r = await engine.score(ScoreCommand("u", cands, Inputs({"hour_of_day": float(hour)})))
            rec = r.record
            if not rec.explored:
                greedy_hits.append(rec.chosen.arm == best_arm(hour))
            await engine.reward(rec.decision_id, reward_for(rec.chosen.arm, hour, rnd))
    finally:
        await engine.close()
        await store.close()
    accuracy = sum(greedy_hits[-LAST:]) / LAST
    assert accuracy >= GREEDY_ACCURACY, f"greedy choice right in {accuracy:.0%}"


async def test_default_policy_learns_the_hour_dependent_best_arm_over_grpc(server: Running) -> None:
    rnd = random.Random(2026)
    hits: list[bool] = []
    for _ in range(ROUNDS):
        hour = rnd.randrange(24)
        resp = await server.stub.Score(
            pb.ScoreRequest(
                user_id="synthetic",
                candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in ARMS],
                context=pb.Context(hour_of_day=hour, day_of_week=2),
            )
        )
        assert resp.policy == "egreedy"
        arm = next(c.arm for c in resp.ranking if c.tip_id == resp.chosen_tip_id)
        hits.append(arm == best_arm(hour))
        await server.stub.Reward(
            pb.RewardRequest(decision_id=resp.decision_id, reward=reward_for(arm, hour, rnd))
        )
    # The server's decision ids are random, so its exploration, and with it what it learns,
    # differ from run to run. Measured on the engine over 1,100 runs of this world (1000
    # rounds each, random or seeded ids): the best-arm rate of the last 200 has mean 0.88
    # and sd 0.04, and about 1 run in 100 lands at 0.64-0.69, with one hour block left on
    # a neighbouring block's arm (the right arm's few exploratory pulls there had
    # underestimated it). The threshold passes such a run, and fails a server that learned
    # two blocks or fewer (about 0.45) or none (0.25, sd 0.03). The engine test above
    # checks the accuracy itself, on seeded ids.
    rate = sum(hits[-LAST:]) / LAST
    assert rate >= 0.55, f"best arm in {rate:.1%} of the last {LAST} (need 55%)"


async def test_new_users_start_from_the_population_prior(tmp_path: Path) -> None:
    engine, store = engine_on(tmp_path / "prior.db", seed=2)
    cands = tuple(Candidate(f"tip-{a}", a) for a in ARMS)
    rnd = random.Random(7)

    async def first_choices(users: list[str]) -> float:
        hits = 0
        for u in users:
            hour = rnd.randrange(24)
            r = await engine.score(ScoreCommand(u, cands, Inputs({"hour_of_day": float(hour)})))
            hits += r.record.chosen.arm == best_arm(hour)
        return hits / len(users)

    try:
        for i in range(20):
            for _ in range(50):
                hour = rnd.randrange(24)
                r = await engine.score(
                    ScoreCommand(f"old{i}", cands, Inputs({"hour_of_day": float(hour)}))
                )
                await engine.reward(
                    r.record.decision_id, reward_for(r.record.chosen.arm, hour, rnd)
                )
        await engine.refresh_priors()
        with_prior = await first_choices([f"new{i}" for i in range(200)])
        assert with_prior >= 0.6, f"new users' first choices hit the best arm {with_prior:.0%}"
        # A policy that has learned nothing has no prior: its new users choose at random.
        for policy in list(engine.models.priors):
            engine.models.set_prior(policy, None)
        without = await first_choices([f"cold{i}" for i in range(200)])
        assert without < with_prior
    finally:
        await engine.close()
        await store.close()

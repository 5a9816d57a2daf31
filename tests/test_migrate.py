"""`oo-ml migrate`: every user's v1 model padded into v2 in one resumable pass over the
SQLite store; right after it, with the new dimensions at their fallback values, a migrated
user's v2 scores equal its v1 scores (the padded coefficients are 0, so the v2-only
features contribute nothing until the user's data moves them)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from oo_ml import cli
from oo_ml import config as config_mod
from oo_ml.app.supervisor import DB_FILE
from oo_ml.domain.features import FEATURE_VERSIONS, Inputs, assemble
from oo_ml.domain.migration import migrate_states
from oo_ml.domain.policies import build_policies, estimates
from oo_ml.domain.rng import rng_for
from oo_ml.domain.state import PolicyState, empty_state
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.stores.sqlite.scoring import SqliteStore

ARMS = ["focus", "break", "plan", "review"]
USERS = [f"user{i:02d}" for i in range(7)]
V1, V2 = FEATURE_VERSIONS["v1"], FEATURE_VERSIONS["v2"]


def _vector(fv_name: str, hour: float, open_tasks: float) -> np.ndarray:
    # Only request values: every v2-only feature (profile) takes its declared fallback.
    feats = assemble(
        ALL_FEATURES, Inputs({"hour_of_day": hour, "open_tasks": open_tasks}), {}, now=0.0
    )
    return FEATURE_VERSIONS[fv_name].vectorise(feats)


def _trained(seed: int) -> PolicyState:
    rnd = np.random.default_rng(seed)
    state = empty_state("egreedy", "v1", V1.dim, 1.0).with_arms(ARMS)
    for _ in range(40):
        x = _vector("v1", float(rnd.integers(24)), float(rnd.integers(10)))
        arm = ARMS[int(rnd.integers(4))]
        state = state.chose(arm).learned(arm, x, float(rnd.random() < 0.4))
    return state


async def _seed_store(path: Path) -> dict[str, PolicyState]:
    store = SqliteStore.open(path)
    states = {u: _trained(i) for i, u in enumerate(USERS)}
    for u, s in states.items():
        assert await store.compare_and_set(u, "egreedy", 0, s) == 1
    # user03 is already served by egreedy-v2: the migration must not overwrite it.
    own = empty_state("egreedy-v2", "v2", V2.dim, 1.0).with_arms(ARMS)
    assert await store.compare_and_set("user03", "egreedy-v2", 0, own) == 1
    await store.close()
    return states


async def _read(path: Path, policy: str) -> dict[str, tuple[int, PolicyState]]:
    store = SqliteStore.open(path)
    try:
        out = {}
        for u in USERS:
            got = await store.get(u, policy)
            if got is not None:
                out[u] = (got.revision, got.state)
        return out
    finally:
        await store.close()


def test_migrate_pads_v1_into_v2_and_scores_are_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / DB_FILE
    v1_states = asyncio.run(_seed_store(db))
    argv = ["migrate", "--from", "egreedy", "--to", "egreedy-v2", "--data-dir", str(tmp_path)]
    assert cli.main([*argv, "--page", "3"]) == 0
    out = capsys.readouterr().out
    assert "6 migrated, 1 skipped" in out

    migrated = asyncio.run(_read(db, "egreedy-v2"))
    assert migrated["user03"][1].rewards == 0  # its own v2 state, untouched
    policies = build_policies(config_mod.load(env={}).scoring)
    for u in USERS:
        if u == "user03":
            continue
        revision, v2 = migrated[u]
        v1 = v1_states[u]
        assert revision == 1 and v2.policy == "egreedy-v2" and v2.feature_version == "v2"
        assert v2.dim == V2.dim and v2.rewards == v1.rewards and v2.decisions == v1.decisions
        for arm in ARMS:
            theta = v2.arms[arm].theta
            np.testing.assert_allclose(theta[: V1.dim], v1.arms[arm].theta, atol=1e-12)
            np.testing.assert_array_equal(theta[V1.dim :], 0.0)
        for hour, tasks in ((7.0, 0.0), (15.0, 3.0), (21.0, 12.0)):
            x1, x2 = _vector("v1", hour, tasks), _vector("v2", hour, tasks)
            assert np.all(x2[: V1.dim] == x1)
            assert np.any(x2[V1.dim :] != 0.0)  # the fallbacks are not zero...
            # ...yet the v2 scores equal the v1 scores, estimate by estimate and as the
            # policies score them.
            np.testing.assert_allclose(
                estimates(v2, x2, ARMS), estimates(v1, x1, ARMS), rtol=0, atol=1e-12
            )
            s1 = policies["egreedy"].select(v1, x1, ARMS, rng_for("d")).scores
            s2 = policies["egreedy-v2"].select(v2, x2, ARMS, rng_for("d")).scores
            np.testing.assert_allclose(s2, s1, rtol=0, atol=1e-12)

    # A second run is a full pass that skips everyone.
    assert cli.main(argv) == 0
    assert "0 migrated, 7 skipped" in capsys.readouterr().out


def test_an_interrupted_migration_resumes_after_its_last_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / DB_FILE
    asyncio.run(_seed_store(db))

    async def interrupted() -> None:
        store = SqliteStore.open(db)
        try:
            r = await migrate_states(
                store, "egreedy", "egreedy-v2", "v2", page=2, stop_after_pages=1
            )
            assert (r.migrated, r.last_user, r.complete) == (2, "user01", False)
            assert await store.migration_cursor("egreedy", "egreedy-v2") == "user01"
        finally:
            await store.close()

    asyncio.run(interrupted())
    argv = ["migrate", "--from", "egreedy", "--to", "egreedy-v2", "--data-dir", str(tmp_path)]
    assert cli.main([*argv, "--page", "2"]) == 0
    out = capsys.readouterr().out
    assert "resumed after 'user01'" in out and "4 migrated, 1 skipped" in out
    assert set(asyncio.run(_read(db, "egreedy-v2"))) == set(USERS)


def test_migrate_refuses_bad_arguments(tmp_path: Path) -> None:
    base = ["migrate", "--data-dir", str(tmp_path)]
    assert cli.main([*base, "--from", "egreedy", "--to", "nope"]) == 2
    assert cli.main([*base, "--from", "egreedy", "--to", "egreedy-v2"]) == 2  # no store yet
    asyncio.run(_seed_store(tmp_path / DB_FILE))
    assert cli.main([*base, "--from", "egreedy-v2", "--to", "egreedy"]) == 2  # would shrink

"""oo-ml's policies beside MABWiser and Vowpal Wabbit on the simulator's synthetic world.

    python -m bench.learning [--seeds 6] [--first-seed 1] [--users 50] [--rounds 150] [--jobs 2]

Every contender runs on the same `sim.world.make_world(SimulationConfig(users, rounds,
seed))` for each seed: the same users, contexts and, for every decision, the same uniform
draw per arm (reward = draw < p, common random numbers). Every contender sees the same
context: the v2 feature vector (12 numbers, bias first) that oo-ml's v2 policies see.
Decisions are made in the simulator's order (round by round, users in turn), each learner
learns the reward of its choice at once, and regret is in expectation, p(best) - p(chosen).

oo-ml's policies run exactly as `oo-ml simulate` runs them (`sim.runner._run_policy`:
per-user states, `rng_for(decision_id)`, population prior refreshed every 10 rounds and
whenever the rewards since the last refresh reach a tenth of those it pooled);
`@noprior` runs them with the prior off. Peers, in two set-ups:

- per user (the default): one MABWiser `MAB` / one VW workspace per user, like oo-ml's
  per-user states (but without a population prior, which neither library has);
- `@global`: one model for everyone, given the user as a feature too (MABWiser: the 12
  numbers plus a one-hot of the user, so each arm's ridge has a per-user intercept; VW:
  a `u` namespace holding the user id, crossed with the action).

Totals are per seed, summed over users; the tables give mean and a 95% t-interval over
seeds, and paired differences (same seeds, so the worlds cancel).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import cache

import numpy as np
import numpy.typing as npt
from scipy import stats

from oo_ml.config import ScoringConfig
from oo_ml.domain.policies import build_policies
from oo_ml.domain.rng import rng_for
from oo_ml.sim.runner import LoggedDecision, _run_policy
from oo_ml.sim.world import ARMS, SimulationConfig, World, decision_id, make_world

FloatArray = npt.NDArray[np.float64]

OO = ("egreedy-v2", "linucb", "lints")
MABWISER = ("LinGreedy", "LinUCB", "LinTS")
VW = ("vw-egreedy", "vw-squarecb")
COUNTERPART = {"egreedy-v2": "LinGreedy", "linucb": "LinUCB", "lints": "LinTS"}
DEFAULT = (
    *OO,
    *(f"{p}@noprior" for p in OO),
    *MABWISER,
    *(f"{p}@global" for p in MABWISER),
    *VW,
    *(f"{p}@global" for p in VW),
    "uniform",
)


EVENING_SHARE = 0.5  # set by --evening-share, before any world is made
PRIOR_EVERY = SimulationConfig().prior_every  # set by --prior-every (oo-ml's rows only)


@cache
def world_for(users: int, rounds: int, seed: int) -> World:
    return make_world(
        SimulationConfig(
            users=users,
            rounds=rounds,
            seed=seed,
            evening_share=EVENING_SHARE,
            prior_every=PRIOR_EVERY,
        )
    )


def personas(world: World) -> tuple[npt.NDArray[np.int64], tuple[str, ...]]:
    """Each user's persona: chronotype x whether they complete tips (completion >= 0.3,
    where the world's completion term changes sign)."""
    evening = world.profile["evening"] > 0.5
    completes = world.profile["completion"] >= 0.3
    names = ("morning/low", "morning/high", "evening/low", "evening/high")
    return (2 * evening + completes).astype(np.int64), names


def _served(world: World) -> list[tuple[int, int]]:
    cfg = world.config
    return [(r, u) for r in range(cfg.rounds) for u in range(cfg.users) if r >= world.joined[u]]


def _regret(world: World, r: int, u: int, arm: int) -> float:
    p = world.p[r, u]
    return float(p.max() - p[arm])


# -- oo-ml -------------------------------------------------------------------------------


def run_oo(world: World, name: str, prior: bool, scoring: ScoringConfig) -> FloatArray:
    policy = build_policies(scoring)[name]
    if not prior:
        world = replace(world, config=replace(world.config, prior_every=0))
    log: list[LoggedDecision] = []
    _run_policy(world, policy, scoring.ridge_lambda, log)
    per_user = np.zeros(world.config.users)
    for d in log:
        u = int(d.user_id.removeprefix("user"))
        per_user[u] += max(d.true_p) - d.true_p[d.chosen]
    return per_user


# -- MABWiser ----------------------------------------------------------------------------


def _mab(kind: str, seed: int, dim: int, scoring: ScoringConfig):  # type: ignore[no-untyped-def]
    from mabwiser.mab import MAB, LearningPolicy

    kind, _, knob = kind.partition("~")  # LinUCB~0.5: alpha (epsilon for LinGreedy) 0.5
    if knob:
        scoring = replace(
            scoring, epsilon=float(knob), linucb_alpha=float(knob), thompson_scale=float(knob)
        )
    lp = {
        "LinGreedy": lambda: LearningPolicy.LinGreedy(epsilon=scoring.epsilon),
        "LinUCB": lambda: LearningPolicy.LinUCB(alpha=scoring.linucb_alpha),
        "LinTS": lambda: LearningPolicy.LinTS(alpha=scoring.thompson_scale),
    }[kind]()
    mab = MAB(list(range(len(ARMS))), lp, seed=seed)
    mab.fit(np.array([], dtype=np.int64), np.array([]), contexts=np.zeros((0, dim)))
    return mab


def run_mabwiser(world: World, kind: str, shared: bool, scoring: ScoringConfig) -> FloatArray:
    cfg = world.config
    xs = world.x["v2"]
    users = cfg.users
    dim = xs.shape[2] + (users if shared else 0)
    models = {}
    per_user = np.zeros(users)
    for r, u in _served(world):
        key = 0 if shared else u
        if key not in models:
            models[key] = _mab(kind, cfg.seed * 100_003 + key, dim, scoring)
        x = xs[r, u]
        if shared:
            x = np.concatenate([x, np.eye(users)[u]])
        ctx = x[np.newaxis, :]
        arm = int(models[key].predict(ctx))
        models[key].partial_fit([arm], [world.reward(r, u, arm)], contexts=ctx)
        per_user[u] += _regret(world, r, u, arm)
    return per_user


# -- Vowpal Wabbit -----------------------------------------------------------------------

_VW_ARGS = {
    "vw-egreedy": "--cb_explore_adf --epsilon {eps}",
    "vw-squarecb": "--cb_explore_adf --squarecb",
}


def _vw_example(x: FloatArray, u: int | None, label: tuple[int, float, float] | None) -> list[str]:
    shared = "shared |s " + " ".join(f"f{i}:{v:.6g}" for i, v in enumerate(x))
    if u is not None:
        shared += f" |u user{u}"
    lines = [shared]
    for a, name in enumerate(ARMS):
        lab = f"0:{label[1]:.6g}:{label[2]:.6g} " if label and label[0] == a else ""
        lines.append(f"{lab}|a arm={name}")
    return lines


def run_vw(world: World, kind: str, shared: bool, scoring: ScoringConfig) -> FloatArray:
    import vowpalwabbit

    cfg = world.config
    xs = world.x["v2"]
    args = _VW_ARGS[kind].format(eps=scoring.epsilon)
    # -q sa: each arm its own weights on the 12 numbers (the numbers include a bias);
    # -q ua: per-user, per-arm intercepts in the global model. cost = 1 - reward.
    inter = "-q sa -q ua" if shared else "-q sa"
    models: dict[int, vowpalwabbit.Workspace] = {}
    per_user = np.zeros(cfg.users)
    try:
        for r, u in _served(world):
            key = 0 if shared else u
            if key not in models:
                seed = cfg.seed * 100_003 + key
                models[key] = vowpalwabbit.Workspace(
                    f"{args} {inter} -b 18 --random_seed {seed} --quiet"
                )
            vw = models[key]
            x = xs[r, u]
            uid = u if shared else None
            pmf = np.asarray(vw.predict(_vw_example(x, uid, None)), dtype=np.float64)
            pmf = pmf / pmf.sum()
            rng = rng_for(decision_id(cfg.seed, r, u), kind)
            # Sample the pmf with the decision's uniform (the same draw every run).
            cdf = np.cumsum(pmf)
            arm = min(
                int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(ARMS) - 1
            )
            reward = world.reward(r, u, arm)
            vw.learn(_vw_example(x, uid, (arm, 1.0 - reward, float(pmf[arm]))))
            per_user[u] += _regret(world, r, u, arm)
    finally:
        for vw in models.values():
            vw.finish()
    return per_user


# -- driving -----------------------------------------------------------------------------


def run(spec: str, users: int, rounds: int, seed: int) -> FloatArray:
    """Per-user cumulative regret of one contender on one seed's world."""
    world = world_for(users, rounds, seed)
    scoring = ScoringConfig()
    name, _, variant = spec.partition("@")
    if name.partition("~")[0] in MABWISER:
        return run_mabwiser(world, name, variant == "global", scoring)
    if name in VW:
        return run_vw(world, name, variant == "global", scoring)
    return run_oo(world, name, variant != "noprior", scoring)


def _task(args: tuple[str, int, int, int]) -> tuple[str, int, FloatArray, float]:
    t0 = time.perf_counter()
    out = run(*args)
    return args[0], args[3], out, time.perf_counter() - t0


def ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return float(v.mean()), half


def _fmt(values: Sequence[float]) -> str:
    m, h = ci(values)
    return f"{m:8.1f} ± {h:5.1f}"


def report(
    specs: Sequence[str],
    *,
    seeds: Sequence[int],
    users: int,
    rounds: int,
    results: dict[tuple[str, int], FloatArray],
    seconds: dict[str, float],
) -> str:
    totals = {s: [float(results[s, k].sum()) for k in seeds] for s in specs}
    lines = [
        f"{users} users x {rounds} rounds, seeds {seeds[0]}..{seeds[-1]} ({len(seeds)});"
        " cumulative regret per seed (sum over users), mean ± 95% CI half-width",
        "",
        "| contender | total regret | s/seed |",
        "|---|---:|---:|",
    ]
    for s in sorted(specs, key=lambda s: ci(totals[s])[0]):
        lines.append(f"| `{s}` | {_fmt(totals[s])} | {seconds[s] / len(seeds):.1f} |")

    def diff(a: str, b: str, note: str = "") -> str:
        d = [x - y for x, y in zip(totals[a], totals[b], strict=True)]
        m, h = ci(d)
        ratio = ci(totals[a])[0] / ci(totals[b])[0]
        return f"| {note}`{a}` − `{b}` | {m:+8.1f} ± {h:5.1f} | {ratio:.3f} |"

    pairs = [(o, c) for o, c in COUNTERPART.items() if o in specs and c in specs]
    peers = [s for s in specs if s.partition("@")[0].partition("~")[0] in (*MABWISER, *VW)]
    ours = [s for s in specs if s.partition("@")[0] in OO]
    if pairs or (peers and ours):
        lines += ["", "Paired differences (same seeds):", ""]
        lines += ["| comparison | difference | ratio of means |", "|---|---:|---:|"]
        lines += [diff(o, c) for o, c in pairs]
        lines += [diff(o, f"{c}@global") for o, c in pairs if f"{c}@global" in specs]
        if peers and ours:
            best_peer = min(peers, key=lambda s: ci(totals[s])[0])
            best_ours = min(ours, key=lambda s: ci(totals[s])[0])
            lines.append(diff(best_ours, best_peer, "best oo-ml − best peer: "))
    # Per persona, with and without the prior.
    prior_pairs = [s for s in specs if s in OO and f"{s}@noprior" in specs]
    if prior_pairs:
        group, names = personas(world_for(users, rounds, seeds[0]))
        lines += [
            "",
            "Per persona: regret with the population prior − without it (paired over"
            " seeds; negative: the prior helps). Personas: chronotype x completion >= 0.3.",
            "",
            "| policy | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for s in prior_pairs:
            cells = []
            for g in range(len(names)):
                d = []
                for k in seeds:
                    grp, _ = personas(world_for(users, rounds, k))
                    mask = grp == g
                    d.append(
                        float(results[s, k][mask].sum() - results[f"{s}@noprior", k][mask].sum())
                    )
                m, h = ci(d)
                cells.append(f"{m:+.1f} ± {h:.1f}")
            lines.append(f"| `{s}` | " + " | ".join(cells) + " |")
        del group
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.learning", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--seeds", type=int, default=6, help="how many seeds")
    ap.add_argument("--first-seed", type=int, default=1, help="seeds run from this one")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--evening-share", type=float, default=0.5, help="share of evening users (personas)"
    )
    ap.add_argument(
        "--prior-every",
        type=int,
        default=SimulationConfig().prior_every,
        help="rounds between refreshes of oo-ml's population priors (the world is unchanged)",
    )
    ap.add_argument("--contenders", default=",".join(DEFAULT))
    ns = ap.parse_args(argv)
    specs = [s for s in ns.contenders.split(",") if s]
    global EVENING_SHARE, PRIOR_EVERY  # noqa: PLW0603 - read by world_for in the workers (fork)
    EVENING_SHARE = ns.evening_share
    PRIOR_EVERY = ns.prior_every
    seeds = list(range(ns.first_seed, ns.first_seed + ns.seeds))
    tasks = [(s, ns.users, ns.rounds, k) for k in seeds for s in specs]
    results: dict[tuple[str, int], FloatArray] = {}
    seconds: dict[str, float] = dict.fromkeys(specs, 0.0)
    t0 = time.perf_counter()
    if ns.jobs > 1:
        with ProcessPoolExecutor(ns.jobs) as pool:
            for spec, seed, out, secs in pool.map(_task, tasks):
                results[spec, seed], seconds[spec] = out, seconds[spec] + secs
    else:
        for spec, seed, out, secs in map(_task, tasks):
            results[spec, seed], seconds[spec] = out, seconds[spec] + secs
    print(
        report(
            specs, seeds=seeds, users=ns.users, rounds=ns.rounds, results=results, seconds=seconds
        )
    )
    print(f"\n({time.perf_counter() - t0:.0f} s wall, {ns.jobs} jobs)")


if __name__ == "__main__":
    main()

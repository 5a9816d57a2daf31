"""Policy cards: `oo-ml cards` writes `docs/policies/<name>.md` for every policy, from the
code, a small seeded simulation and the gate history.

A card has four parts:

- **Inputs**: the feature version, its dimension, and the contracted features that reach
  the vector, found by probing the vectoriser (a feature is an input when moving it off its
  fallback changes the vector), each with its range, source and fallback from the
  contracts declared in proto; the policy's knobs and their defaults.
- **Offline metrics**: the policy beside `uniform` and the incumbent (the default policy,
  `OO_POLICY`) on the simulator (`CARD_SIMULATION`, seeds `CARD_SEEDS`, common random
  numbers): value, mean reward, regret, best-arm rate, exploration rate.
- **Fairness**: the same runs split by segment (morning and evening chronotypes, high and
  low completers, a user's first `NEW_USER_ROUNDS` rounds apart from later ones); each
  segment's mean value beside uniform's and the incumbent's, and whether it is at least as
  good (the check compares means pooled over the seeds' decisions).
- **Rollout history**: every gate verdict about the policy (as candidate or as served),
  from `gate_history` (appended by `oo-ml gate`).

Cards are a pure function of the code, the simulation and the history: `tests/test_cards.py`
regenerates them and compares them with the committed ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from oo_ml.config import ScoringConfig
from oo_ml.domain.contracts import Contracts
from oo_ml.domain.features import FEATURE_VERSIONS, Inputs, assemble
from oo_ml.domain.policies import POLICIES, Policy, build_policies
from oo_ml.sim.runner import PolicyResult, simulate_values
from oo_ml.sim.world import SimulationConfig, World

CARD_SIMULATION = SimulationConfig(users=30, rounds=100)
CARD_SEEDS = (1, 2, 3)
NEW_USER_ROUNDS = 20
"""A user's decisions in their first this-many rounds after joining count as 'new user'."""

DEFAULT_DIR = Path("docs/policies")

_KNOBS: dict[str, tuple[str, ...]] = {
    "egreedy": ("epsilon", "min_exploration", "ridge_lambda"),
    "egreedy-v2": ("epsilon", "min_exploration", "ridge_lambda"),
    "linucb": ("linucb_alpha", "min_exploration", "ridge_lambda"),
    "lints": ("thompson_scale", "min_exploration", "ridge_lambda"),
    "uniform": (),
}

_SUMMARY: dict[str, str] = {
    "egreedy": "ε-greedy on per-user ridge models: the greedy arm (θ·x) with probability"
    " 1 − ε, a uniform arm otherwise.",
    "egreedy-v2": "ε-greedy, as `egreedy`, on the richer v2 features (profile features added).",
    "linucb": "LinUCB: the arm with the largest θ·x + α σ̂ √(xᵀA⁻¹x) (optimism under"
    " uncertainty), deterministic but for ties and the minimum exploration.",
    "lints": "Linear Thompson sampling: the arm whose posterior draw of θ·x is the largest;"
    " propensities exact up to quadrature.",
    "uniform": "Uniform random choice: the baseline and the evaluation slice; learns but"
    " never uses what it learns.",
}

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class SegmentRow:
    segment: str
    decisions: int
    policy: float
    uniform: float
    incumbent: float


@dataclass(frozen=True, slots=True)
class CardData:
    """Everything the cards are made from, simulated once for every policy."""

    results: dict[str, list[PolicyResult]]
    """policy -> its result on each seed."""
    segments: dict[str, list[SegmentRow]]
    incumbent: str


def _segments(world: World) -> dict[str, npt.NDArray[np.bool_]]:
    cfg = world.config
    rounds = np.arange(cfg.rounds)[:, np.newaxis]
    joined = world.joined[np.newaxis, :]
    served = rounds >= joined
    new = served & (rounds < joined + NEW_USER_ROUNDS)
    evening = world.profile["evening"][np.newaxis, :] > 0.5
    completion = world.profile["completion"]
    high = (completion >= np.median(completion))[np.newaxis, :]
    return {
        "all users": served,
        "morning chronotype": served & ~evening,
        "evening chronotype": served & evening,
        "high completers (≥ median)": served & high,
        "low completers (< median)": served & ~high,
        f"new users (first {NEW_USER_ROUNDS} rounds)": new,
        "established users": served & ~new,
    }


@cache
def card_data(scoring: ScoringConfig) -> CardData:
    """The simulations behind the cards (cached: the same config always gives the same)."""
    names = list(POLICIES)
    incumbent = scoring.default_policy
    results: dict[str, list[PolicyResult]] = {n: [] for n in names}
    sums: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, int] = {}
    for seed in CARD_SEEDS:
        config = SimulationConfig(**{**_as_kwargs(CARD_SIMULATION), "seed": seed})
        world, res, values = simulate_values(config, names, scoring)
        for n in names:
            results[n].append(res[n])
        for seg, mask in _segments(world).items():
            counts[seg] = counts.get(seg, 0) + int(mask.sum())
            per = sums.setdefault(seg, {})
            for n in names:
                per.setdefault(n, []).append(float(values[n][mask].sum()))
    segments: dict[str, list[SegmentRow]] = {}
    for n in names:
        rows = []
        for seg, per in sums.items():
            k = max(counts[seg], 1)
            rows.append(
                SegmentRow(
                    seg,
                    counts[seg],
                    sum(per[n]) / k,
                    sum(per["uniform"]) / k,
                    sum(per[incumbent]) / k,
                )
            )
        segments[n] = rows
    return CardData(results, segments, incumbent)


def _as_kwargs(config: SimulationConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def feature_inputs(feature_version: str, contracts: Contracts) -> list[str]:
    """The contracted features that reach the vector: moving one off its fallback (to its
    range's other end) changes the vector."""
    fv = FEATURE_VERSIONS[feature_version]

    def vec(values: dict[str, float | None]) -> FloatArray:
        return fv.vectorise(assemble(contracts, Inputs(values), {}, now=0.0))

    base = vec({})
    used = []
    for name, c in contracts.items():
        probe = c.max if c.fallback != c.max else c.min
        if not np.array_equal(vec({name: probe}), base):
            used.append(name)
    return used


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs))


def render_card(
    policy: Policy,
    scoring: ScoringConfig,
    contracts: Contracts,
    data: CardData,
    history: Sequence[Mapping[str, Any]],
) -> str:
    name = policy.name
    fv = FEATURE_VERSIONS[policy.feature_version]
    knob_fields = {f.name: f for f in fields(ScoringConfig)}
    lines = [
        f"# Policy card: `{name}`",
        "",
        "Generated by `oo-ml cards` from the code, a seeded simulation and the gate history;"
        " do not edit (tests/test_cards.py checks it is current).",
        "",
        _SUMMARY.get(name, ""),
        "",
        "## Inputs (feature contract)",
        "",
        f"Feature version `{fv.name}`, D = {fv.dim} (a bias, then the vectorised features)."
        f" Propensities logged: {'exact' if not policy.deterministic else 'deterministic'}"
        + (
            f", with OO_MIN_EXPLORATION = {scoring.min_exploration} of uniform exploration"
            " mixed in (ADR 0014)."
            if name != "uniform"
            else ", uniform."
        ),
        "",
        "| feature | range | source | fallback | description |",
        "|---|---|---|---|---|",
    ]
    for f in feature_inputs(fv.name, contracts):
        c = contracts[f]
        lines.append(
            f"| `{c.name}` | [{c.min:g}, {c.max:g}] | {c.source.value} | {c.fallback:g}"
            f" | {c.description} |"
        )
    knobs = _KNOBS.get(name, ())
    if knobs:
        lines += ["", "| knob | variable | default |", "|---|---|---|"]
        for k in knobs:
            env = knob_fields[k].metadata["env"]
            lines.append(f"| {k} | `{env}` | {getattr(scoring, k)} |")
    cfg = CARD_SIMULATION
    seeds = ", ".join(map(str, CARD_SEEDS))
    lines += [
        "",
        "## Offline metrics",
        "",
        f"Simulator (`oo_ml.sim`): {cfg.users} users × {cfg.rounds} rounds, seeds {seeds},"
        " same worlds for every policy; mean over the seeds. value: true expected reward of"
        " the propensities per decision; regret: cumulative, vs the oracle, in expectation."
        " The comparison with MABWiser and Vowpal Wabbit is in docs/learning.md.",
        "",
        "| policy | value | mean reward | regret | best arm (last 50 rounds) | explored |",
        "|---|---|---|---|---|---|",
    ]
    shown = list(dict.fromkeys([name, data.incumbent, "uniform"]))
    for p in shown:
        rs = data.results[p]
        label = f"`{p}`" + (" (this)" if p == name else "")
        label += " (incumbent)" if p == data.incumbent and p != name else ""
        lines.append(
            f"| {label} | {_mean([r.expected_reward for r in rs]):.4f}"
            f" | {_mean([r.mean_reward for r in rs]):.4f}"
            f" | {_mean([r.cumulative_regret for r in rs]):.1f}"
            f" | {_mean([r.best_arm_rate for r in rs]):.3f}"
            f" | {_mean([r.explored_rate for r in rs]):.3f} |"
        )
    lines += [
        "",
        "## Fairness (per segment)",
        "",
        "Mean value per decision in each segment (pooled over the seeds), beside `uniform`"
        f" and the incumbent `{data.incumbent}` on the same decisions. ✓: at least as good;"
        " ✗: worse.",
        "",
        f"| segment | decisions | `{name}` | `uniform` | vs uniform |"
        f" `{data.incumbent}` | vs incumbent |",
        "|---|---|---|---|---|---|---|",
    ]
    worse = []
    for row in data.segments[name]:
        vs_u = "✓" if row.policy >= row.uniform else "✗"
        vs_i = "—" if name == data.incumbent else ("✓" if row.policy >= row.incumbent else "✗")
        if "✗" in (vs_u, vs_i):
            worse.append(row.segment)
        lines.append(
            f"| {row.segment} | {row.decisions} | {row.policy:.4f} | {row.uniform:.4f}"
            f" | {vs_u} {row.policy - row.uniform:+.4f} | {row.incumbent:.4f}"
            f" | {vs_i} {'' if name == data.incumbent else f'{row.policy - row.incumbent:+.4f}'} |"
        )
    lines += [
        "",
        "No segment does worse than under uniform or the incumbent."
        if not worse
        else "Segments doing worse than uniform or the incumbent: " + "; ".join(worse) + ".",
        "",
        "## Rollout history",
        "",
    ]
    mine = [h for h in history if name in (h.get("candidate"), h.get("served"))]
    if not mine:
        lines.append("No gate verdict recorded yet (`oo-ml gate` appends them).")
    else:
        lines += [
            "| date | stage | served | candidate | verdict | figures | configuration |",
            "|---|---|---|---|---|---|---|",
        ]
        for h in mine:
            lines.append(
                f"| {h['date']} | {h['mode']} | `{h['served']}` | `{h['candidate']}`"
                f" | **{h['verdict']}** | {_figures(h)} | {_configuration(h)} |"
            )
    return "\n".join(lines) + "\n"


def _figures(h: Mapping[str, Any]) -> str:
    f = h.get("figures", {})
    if h.get("mode") == "offline":
        lo, hi = f["value_ci"]
        return f"value diff {f['value_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    lo, hi = f["dr_ci"]
    return (
        f"DR {f['dr']:.4f} [{lo:.4f}, {hi:.4f}] on {f['samples']} samples,"
        f" served mean {f['served_mean']:.4f}"
    )


def _configuration(h: Mapping[str, Any]) -> str:
    c = dict(h.get("configuration", {}))
    knobs = c.pop("knobs", {})
    parts = [f"{k}={v}" for k, v in sorted(c.items())]
    parts += [f"{k}={v}" for k, v in sorted(knobs.items())]
    return ", ".join(parts).replace("|", "/")


def render_cards(
    scoring: ScoringConfig, contracts: Contracts, history: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    """file name -> card text, for every policy."""
    data = card_data(scoring)
    policies = build_policies(scoring)
    return {
        f"{name}.md": render_card(policies[name], scoring, contracts, data, history)
        for name in POLICIES
    }

"""The simulator's report as text tables, for `oo-ml simulate`."""

from __future__ import annotations

from oo_ml.sim.runner import Report


def render(report: Report) -> str:
    """The report as text tables, for the CLI."""
    sim = report.simulation
    cfg = sim.config
    lines = [
        f"{cfg.users} users joining over the first {cfg.arrival_fraction:.0%} of {cfg.rounds}"
        f" rounds (one decision per joined user per round: {sim.oracle.decisions} decisions a"
        f" policy), seed {cfg.seed}.",
        "value: true expected reward of the policy's propensities; regret: vs the oracle, in"
        " expectation;",
        f"best arm: share of the oracle's choice over the last {cfg.last_rounds} rounds.",
        "",
        f"{'policy':<12} {'fv':<3} {'decisions':>9} {'mean reward':>11} {'value':>8}"
        f" {'regret':>9} {'best arm':>8} {'explored':>8}",
    ]
    for r in (sim.oracle, *sim.policies):
        lines.append(
            f"{r.policy:<12} {r.feature_version:<3} {r.decisions:>9} {r.mean_reward:>11.4f}"
            f" {r.expected_reward:>8.4f} {r.cumulative_regret:>9.1f} {r.best_arm_rate:>8.3f}"
            f" {r.explored_rate:>8.3f}"
        )
    if sim.log and not report.evaluations:
        lines += ["", f"logged {len(sim.log)} decisions of {sim.log_policy}"]
    if report.evaluations:
        served = report.evaluations[0].estimate.served_mean
        lines += [
            "",
            f"off-policy evaluation on {sim.log_policy}'s log ({len(sim.log)} decisions,"
            f" logged mean reward {served:.4f})",
            f"{'policy':<12} {'IPS':>7} {'SNIPS':>7} {'SNIPS 95% CI':>17} {'DR':>7}"
            f" {'DR 95% CI':>17} {'true on log':>11} {'online value':>12}",
        ]
        for e in report.evaluations:
            est = e.estimate
            ci = f"[{est.dr_ci_low:.4f}, {est.dr_ci_high:.4f}]"
            snips_ci = f"[{est.snips_ci_low:.4f}, {est.snips_ci_high:.4f}]"
            lines.append(
                f"{est.policy:<12} {est.ips:>7.4f} {est.snips:>7.4f} {snips_ci:>17}"
                f" {est.dr:>7.4f} {ci:>17} {e.value_on_log:>11.4f}"
                f" {e.online.expected_reward:>12.4f}"
            )
        lines += ["", f"gate (min samples {report.min_samples}, margin {report.margin}):"]
        lines += [f"  {e.decision.reason}" for e in report.evaluations]
    return "\n".join(lines)

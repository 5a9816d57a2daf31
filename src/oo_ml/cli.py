"""The `oo-ml` command: `serve`, `config`, `prompts list`, `simulate`, `gate`, `migrate`, `cards`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from oo_ml import config as config_mod
from oo_ml.errors import OoError
from oo_ml.gate_history import DEFAULT_PATH as DEFAULT_HISTORY


def _serve(ns: argparse.Namespace) -> int:
    # No grpc import before we know which process this is: the parent of N workers never
    # imports it (app/workers.py).
    from oo_ml.app.exposure import exposure_problem

    try:
        cfg = config_mod.load(flags=ns)
    except ValueError as e:
        print(f"oo-ml: bad configuration: {e}", file=sys.stderr)
        return 2
    if ns.no_ingest:
        from dataclasses import replace

        cfg = replace(cfg, ingest=replace(cfg.ingest, enabled=False))
    # Protected mode: checked again by App.start, here before anything starts.
    problem = exposure_problem(cfg.server)
    if problem is not None:
        print(f"oo-ml: {problem}", file=sys.stderr)
        return 2
    if cfg.server.workers > 1 and ns.worker is None:
        from oo_ml.app import logs
        from oo_ml.app.workers import serve_workers

        return serve_workers(
            cfg, log_level=ns.log_level, log_format=ns.log_format or logs.default_format()
        )
    from oo_ml.app.supervisor import serve

    try:
        asyncio.run(serve(cfg, worker=ns.worker))
    except (OoError, ValueError) as e:  # e.g. an unknown default policy or prompt version
        print(f"oo-ml: {e}", file=sys.stderr)
        return 2
    return 0


def _config(ns: argparse.Namespace) -> int:
    rows = config_mod.describe()
    print("| variable | flag | default | meaning |\n|---|---|---|---|")
    for env, flag, default, help_ in rows:
        print(f"| `{env}` | {f'`{flag}`' if flag else ''} | `{default}` | {help_} |")
    return 0


def _prompts(ns: argparse.Namespace) -> int:
    from oo_ml.generate.prompts import list_prompts

    rows = list_prompts(config_mod.load().llm)
    print(f"{'version':<10} {'model':<28} {'temp':>5} {'max_tok':>8}  description")
    for r in rows:
        print(
            f"{r.version:<10} {r.model or '(OO_LLM_MODEL)':<28} {r.temperature:>5.2f}"
            f" {r.max_tokens:>8}  {r.description}"
        )
    return 0


def _simulate(ns: argparse.Namespace) -> int:
    from oo_ml.sim.report import render
    from oo_ml.sim.runner import simulate_and_evaluate
    from oo_ml.sim.world import SimulationConfig

    def names(raw: str) -> list[str]:
        return [n.strip() for n in raw.split(",") if n.strip()]

    evaluate = names(ns.evaluate)
    log_policy = ns.log_policy or ("egreedy" if evaluate else None)
    try:
        report = simulate_and_evaluate(
            SimulationConfig(users=ns.users, rounds=ns.rounds, seed=ns.seed, last_rounds=ns.last),
            names(ns.policies),
            config_mod.load().scoring,
            log_policy=log_policy,
            evaluate=evaluate,
            min_samples=ns.min_samples,
            margin=ns.margin,
        )
    except ValueError as e:
        print(f"oo-ml simulate: {e}", file=sys.stderr)
        return 2
    print(render(report))
    return 0


_POLICY_KNOBS = ("epsilon", "linucb_alpha", "thompson_scale", "ridge_lambda", "min_exploration")


def _seeds(raw: str) -> list[int]:
    """`5` means seeds 1..5; `3,7,11` names them."""
    raw = raw.strip()
    if "," not in raw:
        return list(range(1, int(raw) + 1))
    return [int(s) for s in raw.split(",") if s.strip()]


def _gate_offline(ns: argparse.Namespace) -> int:
    from dataclasses import asdict

    from oo_ml import gate_history
    from oo_ml.sim.runner import offline_gate
    from oo_ml.sim.world import SimulationConfig

    try:
        scoring = config_mod.load().scoring
        result = offline_gate(
            SimulationConfig(users=ns.users, rounds=ns.rounds),
            ns.candidate,
            ns.served,
            _seeds(ns.seeds),
            scoring,
            margin=ns.margin,
        )
    except ValueError as e:
        print(f"oo-ml gate --offline: {e}", file=sys.stderr)
        return 2
    print(
        f"offline gate: {ns.candidate} vs {ns.served}, {ns.users} users x {ns.rounds} rounds,"
        f" seeds {','.join(map(str, result.seeds))}"
    )
    print(f"{'seed':>6} {'candidate value':>15} {'incumbent value':>15} {'difference':>10}")
    for seed, c, i in zip(result.seeds, result.candidate, result.incumbent, strict=True):
        print(
            f"{seed:>6} {c.expected_reward:>15.4f} {i.expected_reward:>15.4f}"
            f" {c.expected_reward - i.expected_reward:>+10.4f}"
        )
    v, r = result.value, result.regret
    print(f"value difference {v.mean:+.4f} [95% CI {v.ci_low:+.4f}, {v.ci_high:+.4f}]")
    print(f"regret difference {r.mean:+.1f} [95% CI {r.ci_low:+.1f}, {r.ci_high:+.1f}]")
    print(result.decision.reason)
    gate_history.append(
        ns.history,
        mode="offline",
        served=ns.served,
        candidate=ns.candidate,
        promote=result.decision.promote,
        reason=result.decision.reason,
        figures={
            "value_difference": round(v.mean, 6),
            "value_ci": [round(v.ci_low, 6), round(v.ci_high, 6)],
            "regret_difference": round(r.mean, 3),
            "regret_ci": [round(r.ci_low, 3), round(r.ci_high, 3)],
            "candidate_value": [round(c.expected_reward, 6) for c in result.candidate],
            "incumbent_value": [round(i.expected_reward, 6) for i in result.incumbent],
        },
        configuration={
            "users": ns.users,
            "rounds": ns.rounds,
            "seeds": list(result.seeds),
            "margin": ns.margin,
            "knobs": {k: v for k, v in asdict(scoring).items() if k in _POLICY_KNOBS},
        },
    )
    return 0 if result.decision.promote else 1


def _gate(ns: argparse.Namespace) -> int:
    if ns.offline:
        return _gate_offline(ns)
    import grpc

    from oo.scoring.v1 import scoring_pb2, scoring_pb2_grpc
    from oo_ml.domain import promotion

    metadata = (("authorization", f"Bearer {ns.token}"),) if ns.token else None
    try:
        with grpc.insecure_channel(ns.address) as channel:
            stats = scoring_pb2_grpc.ScoringServiceStub(channel).Stats(
                scoring_pb2.StatsRequest(policy=ns.served), timeout=ns.timeout, metadata=metadata
            )
    except grpc.RpcError as e:
        print(
            f"oo-ml gate: Stats on {ns.address} failed: {e.code().name}: {e.details()}",
            file=sys.stderr,
        )
        return 2
    shadow = next((s for s in stats.shadows if s.policy == ns.candidate), None)
    if shadow is None:
        known = ", ".join(s.policy for s in stats.shadows) or "none"
        print(
            f"refuse {ns.candidate}: no off-policy samples behind {stats.policy}"
            f" (shadows with samples: {known}; is it in OO_SHADOW_POLICIES?)"
        )
        return 1
    decision = promotion.promote_from_stats(
        policy=shadow.policy,
        samples=shadow.samples,
        ips=shadow.ips,
        snips=shadow.snips,
        dr=shadow.dr,
        dr_ci_low=shadow.dr_ci_low,
        dr_ci_high=shadow.dr_ci_high,
        served_mean=shadow.served_mean,
        min_samples=ns.min_samples,
        margin=ns.margin,
        served=stats.policy,
    )
    print(
        f"{shadow.policy} behind {stats.policy}: samples {shadow.samples}, IPS {shadow.ips:.4f},"
        f" SNIPS {shadow.snips:.4f} [{shadow.snips_ci_low:.4f}, {shadow.snips_ci_high:.4f}],"
        f" DR {shadow.dr:.4f}"
        f" [{shadow.dr_ci_low:.4f}, {shadow.dr_ci_high:.4f}], served mean {shadow.served_mean:.4f}"
    )
    print(decision.reason)
    from oo_ml import gate_history

    gate_history.append(
        ns.history,
        mode="online",
        served=stats.policy,
        candidate=shadow.policy,
        promote=decision.promote,
        reason=decision.reason,
        figures={
            "samples": shadow.samples,
            "ips": shadow.ips,
            "snips": shadow.snips,
            "snips_ci": [shadow.snips_ci_low, shadow.snips_ci_high],
            "dr": shadow.dr,
            "dr_ci": [shadow.dr_ci_low, shadow.dr_ci_high],
            "served_mean": shadow.served_mean,
        },
        configuration={
            "address": ns.address,
            "min_samples": ns.min_samples,
            "margin": ns.margin,
        },
    )
    return 0 if decision.promote else 1


def _migrate(ns: argparse.Namespace) -> int:
    from oo_ml.app.supervisor import DB_FILE
    from oo_ml.domain.migration import MigrationReport, migrate_states
    from oo_ml.domain.policies import build_policies
    from oo_ml.stores.sqlite.scoring import SqliteStore

    try:
        cfg = config_mod.load(flags=ns)
    except ValueError as e:
        print(f"oo-ml migrate: bad configuration: {e}", file=sys.stderr)
        return 2
    policies = build_policies(cfg.scoring)
    unknown = [p for p in (ns.from_policy, ns.to_policy) if p not in policies]
    if unknown:
        print(
            f"oo-ml migrate: unknown policies {unknown}; known: {sorted(policies)}", file=sys.stderr
        )
        return 2
    path = cfg.server.data_dir / DB_FILE
    if not path.exists():
        print(f"oo-ml migrate: no state store at {path}", file=sys.stderr)
        return 2

    def progress(r: MigrationReport) -> None:
        print(f"  ... up to {r.last_user!r}: {r.migrated} migrated, {r.skipped} skipped")

    async def run() -> MigrationReport:
        store = SqliteStore.open(path)
        try:
            return await migrate_states(
                store,
                ns.from_policy,
                ns.to_policy,
                policies[ns.to_policy].feature_version,
                page=ns.page,
                on_page=progress,
            )
        finally:
            await store.close()

    try:
        report = asyncio.run(run())
    except (OoError, ValueError) as e:
        print(f"oo-ml migrate: {e}", file=sys.stderr)
        return 2
    resumed = f" (resumed after {report.resumed_after!r})" if report.resumed_after else ""
    print(
        f"migrated {ns.from_policy} -> {ns.to_policy} ({report.feature_version}){resumed}:"
        f" {report.migrated} migrated, {report.skipped} skipped (already had a"
        f" {ns.to_policy} state), {report.unreadable} unreadable"
    )
    return 0 if report.unreadable == 0 else 1


def _cards(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from oo_ml import gate_history
    from oo_ml.cards import render_cards
    from oo_ml.config import ScoringConfig
    from oo_ml.schema.contracts import ALL_FEATURES

    # The defaults, not the environment: a card describes the policy as shipped.
    cards = render_cards(ScoringConfig(), ALL_FEATURES, gate_history.read(ns.history))
    out = Path(ns.out)
    if ns.check:
        stale = [
            name
            for name, text in cards.items()
            if not (out / name).exists() or (out / name).read_text(encoding="utf-8") != text
        ]
        for name in stale:
            print(f"stale: {out / name} (run oo-ml cards)")
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in cards.items():
        (out / name).write_text(text, encoding="utf-8")
        print(f"wrote {out / name}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oo-ml", description="oO tips scoring server")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument(
        "--log-format",
        choices=("json", "text"),
        default=None,
        help="json (one object a line, with request_id) or text; default: text on a"
        " terminal, json otherwise",
    )
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC scoring server. Every setting comes from its variable, or"
        " from its flag where it has one; a flag wins over the environment.",
        epilog="environment:\n"
        + "\n".join(
            f"  {env:<24} {help_} (default: {default})"
            for env, _flag, default, help_ in config_mod.describe()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_mod.add_flags(serve)
    serve.add_argument(
        "--no-ingest", action="store_true", help="Do not consume NATS JetStream (env OO_INGEST=0)."
    )
    # Set by the parent of `--workers N` on each process it starts (app/workers.py).
    serve.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)
    cfg = sub.add_parser("config", help="list every setting, its variable, flag and default")
    cfg.set_defaults(func=_config)
    prompts = sub.add_parser("prompts", help="the prompt registry")
    prompts_sub = prompts.add_subparsers(dest="prompts_command", required=True)
    prompts_sub.add_parser("list", help="list the prompt versions").set_defaults(func=_prompts)
    simulate = sub.add_parser(
        "simulate",
        help="run policies on a synthetic population (offline, seeded)",
        description="Run the policies on the same synthetic users, contexts and rewards"
        " (oo_ml.sim), and optionally evaluate policies off-policy on one policy's log"
        " and run the promotion gate. Policy knobs (OO_EPSILON, ...) come from the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    simulate.add_argument(
        "--policies",
        default="egreedy,linucb,lints,uniform",
        help="comma-separated policies to run, each on the same world",
    )
    simulate.add_argument("--users", type=int, default=50, help="users in the population")
    simulate.add_argument(
        "--rounds",
        type=int,
        default=300,
        help="steps of time; each serves every user who has joined (users join over the"
        " first quarter of the rounds, so decisions < users x rounds)",
    )
    simulate.add_argument(
        "--seed", type=int, default=1, help="seeds the world and every decision's RNG"
    )
    simulate.add_argument(
        "--last", type=int, default=50, help="rounds over which the best-arm rate is measured"
    )
    simulate.add_argument(
        "--log-policy",
        default="",
        help="policy whose decisions are logged for --evaluate (default: egreedy when"
        " --evaluate is given)",
    )
    simulate.add_argument(
        "--evaluate",
        default="",
        help="comma-separated policies to estimate off-policy on the log, then gate",
    )
    simulate.add_argument(
        "--min-samples", type=int, default=500, help="samples the gate needs to promote"
    )
    simulate.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="how far the DR lower bound must beat the logging policy's mean to promote",
    )
    simulate.set_defaults(func=_simulate)
    gate_cmd = sub.add_parser(
        "gate",
        help="promotion gate: offline over simulated seeds, or on a running server's shadows"
        " (exit 0: promote)",
        description="Two stages (ADR 0013). --offline: run the candidate and the served"
        " (incumbent) policy on the same simulated worlds for each of --seeds, and promote only"
        " when the lower bound of the 95%% t interval of their paired difference in value"
        " exceeds --margin. Online: read the candidate's off-policy estimate from Stats.shadows"
        " and promote it only with at least --min-samples samples and a DR 95%% CI lower bound"
        " above the served mean + --margin. Exit 0: promote; 1: refuse; 2: the server could"
        " not be asked or the arguments are bad. Every verdict is appended to --history.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gate_cmd.add_argument(
        "--offline", action="store_true", help="stage one: simulate instead of asking a server"
    )
    gate_cmd.add_argument("--address", default="127.0.0.1:50051")
    gate_cmd.add_argument("--served", required=True, help="the policy serving traffic")
    gate_cmd.add_argument("--candidate", required=True, help="a shadow of the served policy")
    gate_cmd.add_argument("--min-samples", type=int, default=500)
    gate_cmd.add_argument("--margin", type=float, default=0.0)
    gate_cmd.add_argument("--token", default=None, help="bearer token (OO_AUTH_TOKEN)")
    gate_cmd.add_argument("--timeout", type=float, default=10.0, help="seconds")
    gate_cmd.add_argument("--users", type=int, default=50, help="--offline: users a world")
    gate_cmd.add_argument("--rounds", type=int, default=300, help="--offline: rounds a world")
    gate_cmd.add_argument(
        "--seeds", default="5", help="--offline: N for seeds 1..N, or a comma-separated list"
    )
    gate_cmd.add_argument(
        "--history",
        default=str(DEFAULT_HISTORY),
        help="JSONL file every verdict is appended to ('' to record nothing)",
    )
    gate_cmd.set_defaults(func=_gate)
    migrate = sub.add_parser(
        "migrate",
        help="copy every user's model from one policy to another, padded (resumable)",
        description="One pass over the SQLite state store (OO_DATA_DIR): every user's --from"
        " state is padded to --to's feature version (new coefficients start at 0) and written"
        " under --to with compare-and-set; users who already have a --to state are skipped,"
        " so a re-run is idempotent, and an interrupted run resumes after the last page done."
        " Exit 0: done; 1: some states did not decode; 2: bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    migrate.add_argument("--from", dest="from_policy", required=True, help="source policy")
    migrate.add_argument("--to", dest="to_policy", required=True, help="target policy")
    migrate.add_argument("--data-dir", dest="data_dir", default=None, help="env OO_DATA_DIR")
    migrate.add_argument("--page", type=int, default=500, help="users a transaction page")
    migrate.set_defaults(func=_migrate)
    cards = sub.add_parser(
        "cards",
        help="write a policy card per policy (inputs, offline metrics, fairness, rollout)",
        description="Write <out>/<policy>.md for every policy from the code (default knobs),"
        " a small seeded simulation and the gate history. --check: exit 1 when a committed"
        " card is not what the code would write.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cards.add_argument("--out", default=str(DEFAULT_HISTORY.parent), help="folder of the cards")
    cards.add_argument("--history", default=str(DEFAULT_HISTORY), help="gate history (JSONL)")
    cards.add_argument("--check", action="store_true", help="compare instead of writing")
    cards.set_defaults(func=_cards)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    from oo_ml.app import logs

    logs.configure(
        ns.log_format or logs.default_format(),
        getattr(logging, str(ns.log_level).upper(), logging.INFO),
        worker=getattr(ns, "worker", None),
    )
    try:
        result: int = ns.func(ns)
    except BrokenPipeError:
        # The reader went away (`oo-ml config | head`): not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell tool would
    return result


if __name__ == "__main__":
    sys.exit(main())

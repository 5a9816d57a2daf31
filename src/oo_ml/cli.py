"""The `oo-ml` command: `serve`, `config`, `prompts list`, `simulate`, `gate`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from oo_ml import config as config_mod
from oo_ml.errors import OoError


def _serve(ns: argparse.Namespace) -> int:
    from oo_ml.app.supervisor import serve

    try:
        cfg = config_mod.load(flags=ns)
    except ValueError as e:
        print(f"oo-ml: bad configuration: {e}", file=sys.stderr)
        return 2
    if ns.no_ingest:
        from dataclasses import replace

        cfg = replace(cfg, ingest=replace(cfg.ingest, enabled=False))
    try:
        asyncio.run(serve(cfg))
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


def _gate(ns: argparse.Namespace) -> int:
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
        f" SNIPS {shadow.snips:.4f}, DR {shadow.dr:.4f}"
        f" [{shadow.dr_ci_low:.4f}, {shadow.dr_ci_high:.4f}], served mean {shadow.served_mean:.4f}"
    )
    print(decision.reason)
    return 0 if decision.promote else 1


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
        help="promotion gate on a running server's shadow estimates (exit 0: promote)",
        description="Read the candidate's off-policy estimate from Stats.shadows and promote it"
        " only with at least --min-samples samples and a DR 95% CI lower bound above the"
        " served mean + --margin. Exit 0: promote; 1: refuse; 2: the server could not be asked.",
    )
    gate_cmd.add_argument("--address", default="127.0.0.1:50051")
    gate_cmd.add_argument("--served", required=True, help="the policy serving traffic")
    gate_cmd.add_argument("--candidate", required=True, help="a shadow of the served policy")
    gate_cmd.add_argument("--min-samples", type=int, default=500)
    gate_cmd.add_argument("--margin", type=float, default=0.0)
    gate_cmd.add_argument("--token", default=None, help="bearer token (OO_AUTH_TOKEN)")
    gate_cmd.add_argument("--timeout", type=float, default=10.0, help="seconds")
    gate_cmd.set_defaults(func=_gate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    from oo_ml.app import logs

    logs.configure(
        ns.log_format or logs.default_format(),
        getattr(logging, str(ns.log_level).upper(), logging.INFO),
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

"""The `oo-ml` command: `serve`, `config`, `prompts list`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from oo_ml import config as config_mod
from oo_ml.errors import OoError


def _serve(ns: argparse.Namespace) -> int:
    from oo_ml.server import serve

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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oo-ml", description="oO tips scoring server")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(ns.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    result: int = ns.func(ns)
    return result


if __name__ == "__main__":
    sys.exit(main())

"""Where Score's time goes: `oo-ml serve` with one piece cut out, beside a bare echo.

Each variant is the real server with one part replaced at start (monkeypatched in the
server's own process, never in oo-ml's code):

- `full`: oo-ml as users run it (`--no-ingest`);
- `nolog`: decisions are not logged (no decision-log buffer, no writer thread work);
- `const`: the Score handler returns a prebuilt ten-candidate response: what is left is
  grpc.aio, oo-ml's edge guard (auth, deadline, metrics) and the response's encoding;
- `echo`: `bench.echo`, the bare grpc.aio floor.

And the decision log's writer, piece by piece (SQLite store):

- `thread`: `full` with `OO_DECISION_WRITER=thread`, the decision log committed by the
  store's writer thread instead of the child process (ADR 0023);
- `nocommit`: decisions are buffered and flushed as usual, but their commit returns at
  once, never reaching a writer;
- `nowrite`: the commit runs on the writer thread (transaction and all) but inserts nothing;
- `noencode`: the rows are inserted with a constant 300-byte blob (no encoding);
- `nozlib`: the blob is encoded but not compressed;
- `noship`: the decision log flushes as usual and exchanges a frame with the writer child
  per flush, but an empty one: no rows are encoded on the loop, shipped, or inserted and
  fsynced by the child.

(`nowrite`, `noencode` and `nozlib` cut into the writer thread's work, so they run with
`OO_DECISION_WRITER=thread`: a monkeypatch does not reach the child process.)

The same h2load load as `bench.transport` (4 processes x 1 connection, each its own user
and body), interleaved rounds, medians, and the server's CPU per request:

    python -m bench.ablation --variants echo,full,nolog,const --rounds 3

A variant may name another source tree, `full@/path/to/checkout`: its server imports
oo_ml from that tree's `src` (an A/B of two commits, interleaved in the same rounds). A
variant ending in `+spin` (`noship+spin`) is measured while a process keeps a CPU busy for
`--spin` (default 0.15) of every 5 ms: on a 2-core machine, CPU used anywhere else (the
writer child, the load generator) is taken from the event loop, and this shows how much.

Cutting pieces out changes what the server does, so these servers are for measuring
only; `bench.transport` measures oo-ml as it is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any, NoReturn

VARIANTS = (
    "full",
    "thread",
    "nolog",
    "const",
    "echo",
    "nocommit",
    "nowrite",
    "noencode",
    "nozlib",
    "noship",
)
# The variants that patch the writer thread's work (see the docstring).
_ON_THE_THREAD = ("thread", "nowrite", "noencode", "nozlib")


def serve(variant: str, argv: list[str]) -> int:
    """Run `oo-ml serve argv` with `variant`'s piece cut out."""
    from oo.scoring.v1 import scoring_pb2 as pb

    if variant in ("nolog", "const"):
        from oo_ml.domain.engine import decision_log

        def no_log(self: object, record: object) -> None:
            return None

        decision_log.DecisionLog.append = no_log  # type: ignore[assignment,method-assign]
    if variant == "nocommit":
        from oo_ml.domain.ports import InsertDecision
        from oo_ml.stores.sqlite.scoring import SqliteStore

        commit = SqliteStore.commit

        async def decisions_skipped(self: SqliteStore, writes: Any) -> Any:
            if all(isinstance(w, InsertDecision) for w in writes):
                return {}
            return await commit(self, writes)

        SqliteStore.commit = decisions_skipped  # type: ignore[method-assign]
    if variant == "noship":
        from oo_ml.domain.ports import InsertDecision
        from oo_ml.stores.sqlite.scoring import SqliteStore

        commit_all = SqliteStore.commit

        async def empty_frames(self: SqliteStore, writes: Any) -> Any:
            if self.writer is not None and all(isinstance(w, InsertDecision) for w in writes):
                await self.writer.commit([])
                return {}
            return await commit_all(self, writes)

        SqliteStore.commit = empty_frames  # type: ignore[method-assign]
    if variant in _ON_THE_THREAD:
        os.environ["OO_DECISION_WRITER"] = "thread"
    if variant == "nowrite":
        from oo_ml.stores.sqlite import decision_writer

        decision_writer.insert_decisions = lambda conn, run: None
    if variant == "noencode":
        from oo_ml.stores.sqlite import scoring

        scoring.serialize_decision = lambda record: b"x" * 300
    if variant == "nozlib":
        # The writer compresses (on the thread here, see _ON_THE_THREAD).
        from oo_ml.stores.sqlite import decision_writer

        class Stored:
            @staticmethod
            def compress(data: bytes, level: int) -> bytes:
                return data

        decision_writer.zlib = Stored  # type: ignore[assignment]
    if variant == "const":
        from oo_ml.edge import service

        response = pb.ScoreResponse(
            decision_id="0" * 24,
            chosen_tip_id="tip-0",
            ranking=[
                pb.ScoredCandidate(tip_id=f"tip-{i}", arm=f"arm-{i}", score=0.5, propensity=0.1)
                for i in range(10)
            ],
            policy="egreedy-v2",
            feature_version="v2",
            features=[pb.FeatureValue(name=f"f{i}", value=0.5, origin=1) for i in range(9)],
        )

        async def fixed(self: object, request: object, context: object) -> pb.ScoreResponse:
            return response

        service.ScoringService.Score = fixed  # type: ignore[assignment,method-assign]
    from oo_ml.cli import main

    return main(["serve", *argv])


_SPIN_PERIOD_S = 0.005


def spin(duty: float) -> NoReturn:
    """Keep a CPU busy for `duty` of every 5 ms, until killed."""
    while True:
        end = time.perf_counter() + _SPIN_PERIOD_S * duty
        while time.perf_counter() < end:
            pass
        time.sleep(_SPIN_PERIOD_S * (1.0 - duty))


def run(variants: list[str], rounds: int, seconds: float, spin_duty: float = 0.15) -> None:
    from bench import h2load
    from bench.transport import ECHO_METHOD, SERVICE, score_request, start, warm_oo_ml

    py = sys.executable
    servers = {}
    for v in variants:
        piece, _, tree = v.removesuffix("+spin").partition("@")
        if piece == "echo":
            servers[v] = start(v, "echo", [py, "-m", "bench.echo"])
        else:
            # The server runs in the repository's root: a relative tree is the caller's.
            env = {"PYTHONPATH": os.path.join(os.path.abspath(tree), "src")} if tree else None
            args = [py, "-m", "bench.ablation", "--serve", piece, "--port", "0"]
            servers[v] = start(v, "oo-ml", [*args, "--policy", "egreedy-v2", "--no-ingest"], env)
            warm_oo_ml(servers[v], range(2000), ["egreedy-v2"])

    binary = h2load.ensure_h2load()
    results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    try:
        for r in range(rounds):
            for v in variants:
                s = servers[v]
                method = ECHO_METHOD if s.kind == "echo" else SERVICE + "Score"
                slots = [
                    [
                        h2load.Segment(
                            url=s.url(method),
                            body=h2load.grpc_frame(
                                score_request(100 * c + 10 * r + j, "egreedy-v2")
                            ),
                            headers=h2load.GRPC_HEADERS,
                        )
                        for j in range(5)
                    ]
                    for c in range(4)
                ]
                spinner = None
                if v.endswith("+spin"):
                    spinner = subprocess.Popen(
                        [py, "-m", "bench.ablation", "--spinner", str(spin_duty)]
                    )
                cpu0 = s.cpu_s()
                try:
                    out = h2load.run(slots, seconds, binary)
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
                s.check_alive()
                ms = 1000 * (s.cpu_s() - cpu0) / max(1, out.ok_2xx)
                cores = out.h2load_cpu_s / out.wall_s
                results[v].append((out.qps, ms, cores))
                print(
                    f"  r{r} {v:<6} {out.qps:8.0f} qps  server {ms:.3f} ms/req"
                    f"  h2load {cores:.2f} cores  non-2xx {out.non_2xx}",
                    flush=True,
                )
    finally:
        for s in servers.values():
            s.stop()
    base = statistics.median(q for q, _, _ in results["echo"]) if "echo" in results else None
    print("\n| variant | QPS (median) | × echo | server CPU ms/req |\n|---|---|---|---|")
    for v in variants:
        qps = statistics.median(q for q, _, _ in results[v])
        ms = statistics.median(m for _, m, _ in results[v])
        ratio = f"{qps / base:.2f}" if base else ""
        print(f"| {v} | {qps:.0f} | {ratio} | {ms:.3f} |")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        return serve(argv[1], argv[2:])
    if argv[:1] == ["--spinner"]:  # the `+spin` variants' busy process
        spin(float(argv[1]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="echo,full,nolog,const")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--spin", type=float, default=0.15, help="+spin variants' spinner duty")
    ns = ap.parse_args(argv)
    variants = ns.variants.split(",")
    unknown = {v.removesuffix("+spin").partition("@")[0] for v in variants} - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if not 0.0 < ns.spin < 1.0:
        ap.error("--spin is a share of a CPU, in (0, 1)")
    run(variants, ns.rounds, ns.seconds, ns.spin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Score and Reward throughput and latency, as ratios against a bare grpc.aio echo server.

Both servers run as their own processes; the same load generator (bench/load.py, its own
process) drives each in turn for the same time and concurrency, in the same run. The echo
server answers with the very bytes of the Score request, so the ratio isolates what oo-ml
adds: validation, feature assembly, the policy, and a durable (fsynced) decision log.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from oo.scoring.v1 import scoring_pb2 as pb

ARMS = ["focus", "break", "plan", "review"]
PY = sys.executable


def score_payloads(users: int) -> list[bytes]:
    return [
        pb.ScoreRequest(
            user_id=f"user-{u}",
            candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in ARMS],
            context=pb.Context(hour_of_day=u % 24),
        ).SerializeToString()
        for u in range(users)
    ]


def start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"listening on ([\d.]+:\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, m.group(1)


def load(
    target: str, method: str, payloads: list[bytes], concurrency: int, seconds: float
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".b64", delete=False) as f:
        f.write("\n".join(base64.b64encode(p).decode() for p in payloads))
    out = subprocess.run(
        [
            PY,
            "-m",
            "bench.load",
            "--target",
            target,
            "--method",
            method,
            "--payloads",
            f.name,
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    Path(f.name).unlink()
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def row(name: str, r: dict[str, float], base: dict[str, float] | None) -> str:
    ratio = f"{r['qps'] / base['qps']:.2f}" if base else "1.00"
    return (
        f"{name:<24} {r['qps']:>8.0f} {ratio:>6} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f}"
        f" {r['p99_ms']:>8.2f} {int(r['errors']):>6}"
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--users", type=int, default=1000)
    ns = ap.parse_args(argv)
    payloads = score_payloads(ns.users)
    results: dict[str, dict[str, float]] = {}

    echo, echo_addr = start([PY, "-m", "bench.echo"])
    try:
        results["echo (baseline)"] = load(
            echo_addr, "/bench.Echo/Echo", payloads, ns.concurrency, ns.seconds
        )
    finally:
        echo.terminate()
        echo.wait()

    with tempfile.TemporaryDirectory() as data:
        oo_ml = str(Path(PY).parent / "oo-ml")
        server, addr = start([oo_ml, "serve", "--port", "0", "--data-dir", data, "--no-ingest"])
        try:
            results["Score (egreedy)"] = load(
                addr, "/oo.scoring.v1.ScoringService/Score", payloads, ns.concurrency, ns.seconds
            )
            lin = [pb.ScoreRequest.FromString(p) for p in payloads]
            for r in lin:
                r.policy = "linucb"
            results["Score (linucb, D=12)"] = load(
                addr,
                "/oo.scoring.v1.ScoringService/Score",
                [r.SerializeToString() for r in lin],
                ns.concurrency,
                ns.seconds,
            )
            stats = pb.StatsRequest(user_id="user-1").SerializeToString()
            results["Stats"] = load(
                addr, "/oo.scoring.v1.ScoringService/Stats", [stats], ns.concurrency, ns.seconds
            )
        finally:
            server.terminate()
            server.wait()

    base = results["echo (baseline)"]
    print(
        f"\ngRPC unary, {ns.concurrency} concurrent callers, {ns.seconds:.0f}s each, one load process"
    )
    print(
        f"{'':<24} {'qps':>8} {'ratio':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    for name, r in results.items():
        print(row(name, r, None if r is base else base))
    return results


if __name__ == "__main__":
    main()

"""A closed-loop gRPC load generator: N concurrent callers for T seconds, one process.

It sends pre-serialised bytes through a generic unary method, so the client does no
protobuf work and the same generator drives the echo baseline and oo-ml alike. Prints one
JSON line: calls, errors, qps, p50/p90/p99/max latency in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time

import grpc


def _identity(b: bytes) -> bytes:
    return b


async def run(
    *,
    target: str,
    method: str,
    payloads: list[bytes],
    concurrency: int,
    seconds: float,
    metadata: tuple[tuple[str, str], ...],
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            method, request_serializer=_identity, response_deserializer=_identity
        )
        await channel.channel_ready()
        # Warm-up, not measured.
        for p in payloads[:20]:
            await call(p, metadata=metadata)
        stop_at = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal errors
            n = i
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    await call(payloads[n % len(payloads)], metadata=metadata)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                n += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(int(q * len(latencies)), len(latencies) - 1)] * 1000 if latencies else 0.0
        )

    return {
        "calls": len(latencies),
        "errors": errors,
        "qps": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] * 1000 if latencies else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--payloads", required=True, help="file of base64 payloads, one a line")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ns = ap.parse_args()
    with open(ns.payloads) as f:
        payloads = [base64.b64decode(line) for line in f if line.strip()]
    print(
        json.dumps(
            asyncio.run(
                run(
                    target=ns.target,
                    method=ns.method,
                    payloads=payloads,
                    concurrency=ns.concurrency,
                    seconds=ns.seconds,
                    metadata=(),
                )
            )
        )
    )


if __name__ == "__main__":
    main()

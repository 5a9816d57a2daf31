"""Is Score's latency affected by Generate calls in flight? Measured, not assumed.

Three runs against one `oo-ml serve` process each, Score driven by the same load
generator (bench/load.py, its own process) at the same concurrency for the same time:

1. Score alone;
2. Score while Generate calls start at `--rate` per second against a slow
   OpenAI-compatible model on 127.0.0.1 (each answer takes `--model-delay` seconds), so
   rate x delay calls are in flight on the LiteLLM path the whole time (measured after
   the model path is warm: LiteLLM's import is a start-up cost);
3. Score while Generate calls arrive at the same rate on a server with no model
   configured (the `make run` default: every Generate is a curated fallback).

It prints Score's qps and latency percentiles per run, and each run's p50/p99 as a ratio
of the alone run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from bench.score import PY, load, score_payloads, start
from oo.scoring.v1 import scoring_pb2 as pb
from oo.scoring.v1 import scoring_pb2_grpc


async def slow_model(delay: float) -> tuple[web.AppRunner, str]:
    async def chat(request: web.Request) -> web.Response:
        await request.json()
        await asyncio.sleep(delay)
        body: dict[str, Any] = {
            "id": "x",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "slow",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Finish one small task now."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


async def warm(addr: str, seconds: float = 60.0) -> None:
    """Wait until Generate answers from the model: LiteLLM's import (seconds of CPU on a
    thread at start) is a start-up cost, not what this measures."""
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = scoring_pb2_grpc.ScoringServiceStub(ch)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            r = await stub.Generate(pb.GenerateRequest(user_id="warm"), timeout=30)
            if not r.fallback:
                return
            await asyncio.sleep(0.5)
    raise SystemExit(f"the model path never answered: {r.fallback_reason}")


async def generate_load(addr: str, rate: float, stop: asyncio.Event) -> dict[str, Any]:
    """Start Generate calls at a fixed rate (open loop), each left to run to its end."""
    counts: dict[str, Any] = {"calls": 0, "errors": 0, "reasons": {}}
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = scoring_pb2_grpc.ScoringServiceStub(ch)

        async def one(i: int) -> None:
            try:
                r = await stub.Generate(pb.GenerateRequest(user_id=f"g{i}"), timeout=30)
            except grpc.aio.AioRpcError:
                counts["errors"] += 1
                return
            counts["calls"] += 1
            reason = r.fallback_reason or "model"
            counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1

        tasks = []
        i = 0
        started = time.monotonic()
        while not stop.is_set():
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(started + i / rate - time.monotonic(), 0))
        await asyncio.gather(*tasks)
    return counts


async def scenario(
    name: str, env: dict[str, str], rate: float, ns: argparse.Namespace, *, model: bool
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as data:
        oo_ml = str(Path(PY).parent / "oo-ml")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("OO_")} | env
        os.environ.update({"OPENAI_API_KEY": "sk-bench"})
        server, addr = start_env(
            [oo_ml, "serve", "--port", "0", "--data-dir", data, "--no-ingest"], full_env
        )
        try:
            if model:
                await warm(addr)
            stop = asyncio.Event()
            gen = asyncio.create_task(generate_load(addr, rate, stop)) if rate else None
            # Let the Generate calls reach their steady state before Score is measured.
            await asyncio.sleep(ns.model_delay + 0.5 if rate else 0)
            result = await asyncio.to_thread(
                load,
                addr,
                "/oo.scoring.v1.ScoringService/Score",
                score_payloads(200),
                ns.concurrency,
                ns.seconds,
            )
            stop.set()
            result["generate"] = await gen if gen else {}
        finally:
            server.terminate()
            server.wait()
    result["name"] = name
    return result


def start_env(args: list[str], env: dict[str, str]) -> tuple[Any, str]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return start(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def run(ns: argparse.Namespace) -> list[dict[str, Any]]:
    runner, api_base = await slow_model(ns.model_delay)
    try:
        model_env = {
            "OO_LLM_MODEL": "openai/slow",
            "OO_LLM_API_BASE": api_base,
            "OO_LLM_TIMEOUT_S": str(ns.model_delay + 5),
            "OO_LLM_CONCURRENCY": str(int(ns.rate * ns.model_delay) + 8),
            "OPENAI_API_KEY": "sk-bench",
        }
        in_flight = ns.rate * ns.model_delay
        return [
            await scenario("Score alone", {}, 0, ns, model=False),
            await scenario(
                f"+Generate {ns.rate:g}/s, ~{in_flight:g} in flight (model)",
                model_env,
                ns.rate,
                ns,
                model=True,
            ),
            await scenario(
                f"+Generate {ns.rate:g}/s (no model: fallback)", {}, ns.rate, ns, model=False
            ),
        ]
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float, default=16.0, help="Generate calls started per second")
    ap.add_argument("--model-delay", type=float, default=2.0, help="seconds the model takes")
    ns = ap.parse_args(argv)
    results = asyncio.run(run(ns))
    base = results[0]
    print(f"\nScore with {ns.concurrency} concurrent callers, {ns.seconds:.0f}s per run")
    print(
        f"{'run':<44} {'qps':>7} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>6} {'p99 x':>6}  Generate calls"
    )
    for r in results:
        g = r["generate"]
        gen = f"{g['calls']} done {g['reasons']}, {g['errors']} errors" if g else "-"
        print(
            f"{r['name']:<44} {r['qps']:>7.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
            f" {r['p50_ms'] / base['p50_ms']:>6.2f} {r['p99_ms'] / base['p99_ms']:>6.2f}  {gen}"
        )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()

"""A fake OpenAI-compatible chat server on 127.0.0.1, for driving LiteLLM's real HTTP path.

`FakeLLM` serves `POST /v1/chat/completions` from aiohttp in the test's own event loop,
records every request body it receives, and is told per test how to answer: the text to
reply with (`text`), the chunks to stream (`chunks`), a delay before answering
(`delay_s`), a delay between streamed chunks (`chunk_delay_s`), an HTTP status to fail
with (`status`, for the first `fail_times` requests or all of them), or a stream that
breaks off after some chunks (`break_after`).

Binds port 0, so tests never collide, and never talks to anything but its own clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

USAGE = {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}


class FakeLLM:
    def __init__(self) -> None:
        self.text = "Pick the smallest overdue task and finish it before lunch."
        self.chunks: list[str] | None = None
        self.delay_s = 0.0
        self.chunk_delay_s = 0.0
        self.status = 200
        self.fail_times: int | None = None  # None: every request fails when status != 200
        self.break_after: int | None = None
        self.usage: dict[str, int] = dict(USAGE)
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        # Set to an Event to hold every answer until it is set (or the server closes).
        self.hold: asyncio.Event | None = None
        self.answered = 0  # responses sent, in full or as a stream's end
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> FakeLLM:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        # handler_cancellation: a client that gives up (our deadline) cancels the handler,
        # so a delayed answer does not hold the test's teardown.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _sleep(self, seconds: float) -> None:
        # Returns early when the server closes, so teardown never waits out a long delay.
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._sleep(self.delay_s)
            if self.hold is not None:
                await _first_of(self.hold.wait(), self._closing.wait())
            failing = self.status != 200 and (
                self.fail_times is None or len(self.requests) <= self.fail_times
            )
            if failing:
                return web.json_response(
                    {"error": {"message": "fake failure", "type": "server_error", "code": None}},
                    status=self.status,
                )
            if body.get("stream"):
                return await self._stream(request, body)
            self.answered += 1
            return web.json_response(self._completion(body))
        finally:
            self.in_flight -= 1

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": self.usage,
        }

    def _chunk(self, body: dict[str, Any], delta: dict[str, Any], finish: str | None) -> bytes:
        payload = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(payload)}\n\n".encode()

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = self.chunks if self.chunks is not None else [self.text]
        await resp.write(self._chunk(body, {"role": "assistant", "content": ""}, None))
        for i, piece in enumerate(chunks):
            if self.break_after is not None and i >= self.break_after:
                # Drop the connection mid-stream, as a crashed provider would.
                assert request.transport is not None
                request.transport.close()
                return resp
            await self._sleep(self.chunk_delay_s)
            await resp.write(self._chunk(body, {"content": piece}, None))
        await resp.write(self._chunk(body, {}, "stop"))
        self.answered += 1
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model", "fake-model"),
                "choices": [],
                "usage": self.usage,
            }
            await resp.write(f"data: {json.dumps(usage_chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _first_of(*waits: Any) -> None:
    """Until the first of the awaitables is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()

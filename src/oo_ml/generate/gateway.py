"""The model call: the `LLMClient` plug point, its LiteLLM implementation, and `Gateway`.

Owns:
- `LLMClient` (Protocol): one attempt at one completion, plain or streamed. Implementations
  turn every provider failure into `ProviderError`, so nothing above knows the provider SDK.
- `LiteLLMClient`: `litellm.acompletion` over HTTP. LiteLLM takes seconds to import, so it
  is imported lazily, off the event loop, and offline (see `load_litellm`).
  `warm_in_background` starts that import in a daemon thread at server start; a model
  call made before it ends waits for it, within its deadline.
- `Gateway`: the call policy around any client. One deadline (`OO_LLM_TIMEOUT_S`) covers
  waiting for a concurrency slot, every attempt and the backoff between them; at most
  `OO_LLM_RETRIES` retries of retryable failures; an `asyncio.Semaphore` bounds calls in
  flight (`OO_LLM_CONCURRENCY`): a call waits for a slot, and one that cannot get a slot
  before its deadline, or gets it with less than a fifth of its deadline left, fails as
  "overloaded". A stream holds its slot until it ends or is closed. Every way of giving
  up is an `LLMFailure` whose `reason` is the fallback reason the response reports.

A streamed call is retried only before its first text arrives: after that, a retry would
repeat text the caller has already passed on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import importlib
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from oo_ml.config import LLMConfig
from oo_ml.errors import LLMFailure, ProviderError

log = logging.getLogger(__name__)

_BACKOFF_S = 0.05  # first retry backoff; doubles per attempt, always inside the deadline
# LiteLLM's own timeout is only a backstop that frees the connection: our asyncio deadline
# is the authority, so LiteLLM gets a little more and never wins the race.
_CLIENT_TIMEOUT_SLACK_S = 0.5
_MIN_SHARE_LEFT = 0.2  # of the deadline, when a slot frees up, to still start the call


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


NO_USAGE = Usage()


@dataclass(frozen=True, slots=True)
class LLMRequest:
    model: str
    prompt: str
    temperature: float
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a streamed completion: a text delta, usage (usually last), or both."""

    delta: str = ""
    usage: Usage | None = None


class LLMClient(Protocol):
    """One attempt at a chat completion of a single user message."""

    async def complete(self, request: LLMRequest, timeout_s: float) -> Completion: ...

    def stream(self, request: LLMRequest, timeout_s: float) -> AsyncIterator[Chunk]: ...


# ---------------------------------------------------------------------------- LiteLLM

# Each of these makes LiteLLM read its bundled copy instead of fetching from GitHub at
# import or first use: the servers have no internet, and an import must not hang on it.
_OFFLINE_ENV = (
    "LITELLM_LOCAL_MODEL_COST_MAP",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS",
    "LITELLM_LOCAL_BLOG_POSTS",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS",
    "LITELLM_LOCAL_POLICY_TEMPLATES",
)


class _Loaded:
    """LiteLLM once imported, the one import in progress, and how long it took."""

    lock = threading.Lock()  # held for the whole import
    start_lock = threading.Lock()  # held only to start the import thread once
    module: ModuleType | None = None
    seconds: float | None = None
    future: concurrent.futures.Future[ModuleType] | None = None


# Work LiteLLM otherwise does lazily inside its first call, on the event loop, blocking
# every other request for up to a second on these machines: importing the OpenAI SDK's
# resources and tiktoken's bundled encoding, and building pydantic schemas of the response
# types. Doing it at import keeps it on the importing thread (warm-up or worker).
_PRELOAD_MODULES = (
    "openai.resources",
    "litellm.litellm_core_utils.default_encoding",
    "litellm.proxy._types",
    "litellm.types.litellm_core_utils.streaming_chunk_builder_utils",
    "anyio._backends._asyncio",
)


def _preload(litellm: Any) -> None:
    for name in _PRELOAD_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            # Best effort: a module another LiteLLM version moved only costs the first
            # call its time again; worth a line in the log, not a failure.
            log.warning("litellm preload: %s not found; the first call pays for it", name)
    litellm.ModelResponse()
    litellm.ModelResponseStream()


def import_seconds() -> float | None:
    """How long `import litellm` took, or None while it has not happened."""
    return _Loaded.seconds


def load_litellm() -> ModuleType:
    """Import and configure LiteLLM once; blocking, thread-safe, idempotent."""
    with _Loaded.lock:
        if _Loaded.module is not None:
            return _Loaded.module
        for name in _OFFLINE_ENV:
            os.environ.setdefault(name, "True")
        # In its default DEV mode LiteLLM loads a .env from the working directory into
        # os.environ at import: not something a server should pick up by accident.
        os.environ.setdefault("LITELLM_MODE", "PRODUCTION")
        started = time.perf_counter()
        # The import creates ~300k objects. Each full collection during it holds the GIL
        # for 100-250 ms (stalling the event loop while this runs in a thread), so the
        # collector waits until the import is done.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            litellm = _import_and_configure()
        finally:
            if gc_was_enabled:
                gc.enable()
        # Then those objects move out of the collector's sight for good: otherwise every
        # later full collection walks them all, a ~250 ms pause on the event loop in the
        # middle of some request. They live as long as the process anyway. (Process-wide:
        # whatever else exists at this moment is frozen too, which at startup is modules.)
        gc.freeze()
        _Loaded.seconds = time.perf_counter() - started
        _Loaded.module = litellm
        log.info("litellm imported in %.1f s", _Loaded.seconds)
        return litellm


def _import_and_configure() -> ModuleType:
    # Imported here, not at the top: it costs seconds and ~170 MB, and servers without a
    # model configured never need it.
    litellm: Any = importlib.import_module("litellm")
    # Stops the "Give Feedback / Get Help" banners LiteLLM prints on every error.
    litellm.suppress_debug_info = True
    # Keeps prompts (task titles) out of any LiteLLM logging callback.
    litellm.turn_off_message_logging = True
    # Token counting must never download a tokenizer; the bundled tiktoken files do.
    litellm.disable_hf_tokenizer_download = True
    # LiteLLM's and the OpenAI SDK's debug logs carry request bodies, task titles
    # included. Unless someone set a level on purpose, keep them at WARNING even when the
    # root logger is at DEBUG.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "openai"):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.WARNING)
    # 1.106.2 has no telemetry switch (upstream removed its telemetry); the callback lists
    # that could ship data elsewhere stay empty unless someone configures them.
    _preload(litellm)
    module: ModuleType = litellm
    return module


def warm_in_background() -> concurrent.futures.Future[ModuleType]:
    """Start importing LiteLLM in a daemon thread, once; returns at once (server start).

    Every caller, and every model call waiting for the import, shares this one import:
    waiters hold no executor thread (a pool blocked on a 5 s import would stall whatever
    else the server runs in it).
    """
    with _Loaded.start_lock:
        if _Loaded.future is not None:
            return _Loaded.future
        future: concurrent.futures.Future[ModuleType] = concurrent.futures.Future()
        # RUNNING from the start, so a waiter's cancellation (its deadline) can never
        # cancel the shared import under the other waiters.
        future.set_running_or_notify_cancel()

        def run() -> None:
            try:
                future.set_result(load_litellm())
            except BaseException as e:
                # Seen in the log; every model call then falls back with this error.
                log.exception("importing litellm failed")
                future.set_exception(e)

        threading.Thread(target=run, name="oo-ml-litellm-import", daemon=True).start()
        _Loaded.future = future
        return future


async def aload_litellm() -> ModuleType:
    """LiteLLM, imported off the event loop the first time so the loop keeps serving."""
    if _Loaded.module is not None:
        return _Loaded.module
    return await asyncio.wrap_future(warm_in_background())


def _usage_of(raw: Any) -> Usage | None:
    if raw is None:
        return None
    return Usage(
        prompt_tokens=int(getattr(raw, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(raw, "completion_tokens", 0) or 0),
        total_tokens=int(getattr(raw, "total_tokens", 0) or 0),
    )


def _provider_error(litellm: ModuleType, e: Exception) -> ProviderError:
    status = getattr(e, "status_code", None)
    name = type(e).__name__
    timed_out = isinstance(e, litellm.Timeout | TimeoutError)
    detail = f"{name} (HTTP {status})" if isinstance(status, int) else name
    # Rate limits, conflicts, 5xx and transport errors may pass; other 4xx will not.
    retryable = (
        timed_out or not isinstance(status, int) or status in (408, 409, 429) or status >= 500
    )
    return ProviderError(detail, retryable=retryable, timed_out=timed_out)


async def _litellm_or_error() -> ModuleType:
    try:
        return await aload_litellm()
    except Exception as e:
        # A broken install is not a server error: Generate still answers, with a fallback
        # whose reason names the failure.
        raise ProviderError(type(e).__name__, retryable=False) from e


class LiteLLMClient:
    """`LLMClient` over `litellm.acompletion`; retries are the Gateway's, never LiteLLM's."""

    def __init__(self, api_base: str | None = None) -> None:
        self._api_base = api_base

    def _kwargs(self, request: LLMRequest, timeout_s: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": "user", "content": request.prompt}],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "timeout": timeout_s + _CLIENT_TIMEOUT_SLACK_S,
            # Both retry layers (LiteLLM's wrapper and the OpenAI SDK) off: a hidden retry
            # would spend our deadline and defeat OO_LLM_RETRIES.
            "num_retries": 0,
            "max_retries": 0,
        }
        if self._api_base:
            kwargs["api_base"] = self._api_base
        return kwargs

    async def complete(self, request: LLMRequest, timeout_s: float) -> Completion:
        litellm = await _litellm_or_error()
        try:
            resp = await litellm.acompletion(**self._kwargs(request, timeout_s))
        except Exception as e:
            raise _provider_error(litellm, e) from e
        choices = getattr(resp, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        text = getattr(message, "content", None) or ""
        return Completion(text=str(text), usage=_usage_of(getattr(resp, "usage", None)) or NO_USAGE)

    async def stream(self, request: LLMRequest, timeout_s: float) -> AsyncIterator[Chunk]:
        litellm = await _litellm_or_error()
        kwargs = self._kwargs(request, timeout_s)
        try:
            resp = await litellm.acompletion(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
        except Exception as e:
            raise _provider_error(litellm, e) from e
        try:
            it = aiter(resp)
            while True:
                try:
                    raw = await anext(it)
                except StopAsyncIteration:
                    return
                except Exception as e:
                    raise _provider_error(litellm, e) from e
                choices = getattr(raw, "choices", None) or []
                delta = getattr(choices[0], "delta", None) if choices else None
                text = getattr(delta, "content", None) or ""
                usage = _usage_of(getattr(raw, "usage", None))
                if text or usage is not None:
                    yield Chunk(delta=str(text), usage=usage)
        finally:
            # Releases the HTTP connection when the caller stops early (deadline, cutoff).
            aclose = getattr(resp, "aclose", None)
            if aclose is not None:
                await aclose()


# ---------------------------------------------------------------------------- policy


class Gateway:
    """Deadline, retries and a concurrency bound around an `LLMClient`."""

    def __init__(self, config: LLMConfig, client: LLMClient) -> None:
        self._timeout_s = config.timeout_s
        self._retries = max(config.retries, 0)
        self._slots = asyncio.Semaphore(config.concurrency)
        self._client = client

    async def _acquire(self, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise LLMFailure("overloaded") from None
        # A slot that comes too late to finish a call in is no slot: starting a request
        # that cannot finish only spends provider quota and reports "timeout" for what
        # was really a queue.
        left = deadline - asyncio.get_running_loop().time()
        if left < self._timeout_s * _MIN_SHARE_LEFT:
            self._slots.release()
            raise LLMFailure("overloaded")

    def _retry_delay(self, e: ProviderError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now."""
        if not e.retryable or attempt >= self._retries:
            return None
        delay = _BACKOFF_S * (1 << attempt)
        # Not enough time left for a backoff and a useful attempt: report the real error
        # rather than let the deadline turn it into "timeout".
        if deadline - asyncio.get_running_loop().time() <= delay * 2:
            return None
        return delay

    async def complete(self, request: LLMRequest) -> Completion:
        """One completion within the deadline, or `LLMFailure`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        await self._acquire(deadline)
        try:
            async with asyncio.timeout_at(deadline):
                attempt = 0
                while True:
                    try:
                        return await self._client.complete(request, deadline - loop.time())
                    except ProviderError as e:
                        delay = self._retry_delay(e, attempt, deadline)
                        if delay is None:
                            raise _failure(e) from e
                        log.debug("llm attempt %d failed (%s); retrying", attempt + 1, e.detail)
                        attempt += 1
                        await asyncio.sleep(delay)
        except TimeoutError:
            raise LLMFailure("timeout") from None
        finally:
            self._slots.release()

    async def stream(self, request: LLMRequest) -> AsyncGenerator[Chunk, None]:
        """Chunks as they arrive, within the deadline; `LLMFailure` when it gives up.

        Close it (`contextlib.aclosing`) when stopping early: the slot is held until then.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        await self._acquire(deadline)
        try:
            attempt = 0
            while True:
                started = False
                it = self._client.stream(request, deadline - loop.time())
                try:
                    while True:
                        # The timeout wraps each wait, never a yield: a timeout spanning a
                        # yield would cancel whatever the consumer is doing meanwhile.
                        try:
                            async with asyncio.timeout_at(deadline):
                                chunk = await anext(it)
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            raise LLMFailure("timeout") from None
                        started = started or bool(chunk.delta)
                        yield chunk
                except ProviderError as e:
                    delay = None if started else self._retry_delay(e, attempt, deadline)
                    if delay is None:
                        raise _failure(e) from e
                    attempt += 1
                    try:
                        async with asyncio.timeout_at(deadline):
                            await asyncio.sleep(delay)
                    except TimeoutError:
                        raise LLMFailure("timeout") from None
                finally:
                    aclose = getattr(it, "aclose", None)
                    if aclose is not None:
                        await aclose()
        finally:
            self._slots.release()


def _failure(e: ProviderError) -> LLMFailure:
    return LLMFailure("timeout" if e.timed_out else f"provider error: {e.detail}")

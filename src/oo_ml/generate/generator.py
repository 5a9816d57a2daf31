"""`Generator`: writes a tip for a user with the LLM, or returns a curated fallback and says why.

Owns the Generate flow: resolve the prompt version, pick the model (the version's, else
OO_LLM_MODEL), read the user's open tasks, render the prompt, call the model through the
`Gateway`, check the output, and build a `Generation`. Every failure becomes a curated
fallback (`fallback=True`) with exactly one `fallback_reason`:
"no model configured", "timeout", "overloaded", "provider error: <class (HTTP status)>",
"empty output", "output too long", "content check failed: <why>".
Only an unknown prompt version is an error (`InvalidArgument`), raised before any model
call (on the first iteration, for `stream`). A failing task store is not a fallback: its
error propagates (a TransientStoreError is UNAVAILABLE, which the caller may retry). The
model deadline (OO_LLM_TIMEOUT_S) starts after the tasks are read.

Streaming contract (`Generator.stream`): it yields text deltas (`str`) as they arrive and
then exactly one `Generation`, which is authoritative: its `text` is what to show and what
the `generation_id` refers to; the deltas are a preview.
- If nothing was yielded yet when the call fails (no model, no slot, timeout or provider
  error before the first delta, empty output), the fallback text is yielded as a single
  delta, so the deltas still concatenate to the result.
- If the call fails after deltas went out (deadline mid-stream, broken connection) or the
  finished text fails the content checks, no more deltas are yielded and the Generation
  carries the curated fallback: the client must replace the preview with `result.text`.
  Partial model text is never the result, because it was never checked as a whole.
- The output-length check runs as deltas arrive: once the text is certain to end up longer
  than OO_LLM_MAX_CHARS the stream is cut (saving tokens) with "output too long".
- On success the result's text is the deltas' concatenation, cleaned (whitespace collapsed,
  surrounding quotes stripped).
Callers that stop iterating early must close the iterator (`contextlib.aclosing`), which
frees the concurrency slot at once.

Logging: one INFO line per generation with version, model, fallback reason, latency, token
counts and how many tasks the prompt listed; never task titles, prompts or tip text.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

from oo_ml.config import LLMConfig
from oo_ml.domain.features import Assembled, TaskSource, TaskView
from oo_ml.errors import LLMFailure
from oo_ml.generate.fallback import check_output, clean_output, pick_fallback
from oo_ml.generate.gateway import (
    NO_USAGE,
    Gateway,
    LiteLLMClient,
    LLMClient,
    LLMRequest,
    Usage,
    warm_in_background,
)
from oo_ml.generate.prompts import (
    MAX_TASKS,
    REGISTRY,
    PromptVersion,
    render_prompt,
    resolve_version,
)

log = logging.getLogger(__name__)

NO_MODEL = "no model configured"


@dataclass(frozen=True, slots=True)
class Generation:
    """The result of one Generate: a model tip, or a curated fallback and why."""

    text: str
    prompt_version: str
    model: str
    """The model asked ("" when none is configured), also on a fallback."""
    fallback: bool
    fallback_reason: str
    """"" unless fallback."""
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    """Tokens spent, also when the output was then rejected."""
    generation_id: str


@dataclass(slots=True)
class _Call:
    """What one Generate has settled so far, for building its result."""

    started: float
    version: str
    prompt: PromptVersion
    model: str  # "" when none is configured
    features: Assembled
    tasks_listed: int = 0


class Generator:
    def __init__(
        self,
        config: LLMConfig,
        tasks: TaskSource,
        client: LLMClient | None = None,
        registry: Mapping[str, PromptVersion] = REGISTRY,
    ) -> None:
        self._config = config
        self._tasks = tasks
        self._registry = registry
        self._uses_litellm = client is None
        self._gateway = Gateway(
            config, client if client is not None else LiteLLMClient(config.api_base)
        )

    async def aclose(self) -> None:
        """Close LiteLLM's pooled async HTTP clients, if LiteLLM was ever loaded."""
        litellm = sys.modules.get("litellm")
        if litellm is None or not self._uses_litellm:
            return
        from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

        await close_litellm_async_clients()  # type: ignore[no-untyped-call]

    def resolve_version(self, user_id: str, requested: str) -> str:
        """The prompt version for this request; `InvalidArgument` when unknown."""
        return resolve_version(self._config, user_id, requested, self._registry)

    def model_for(self, version: str) -> str | None:
        return self._registry[version].model or self._config.model

    def warm(self) -> concurrent.futures.Future[ModuleType] | None:
        """Import LiteLLM in the background if any version can reach a model; never blocks."""
        if not self._uses_litellm:
            return None
        if self._config.model is None and not any(p.model for p in self._registry.values()):
            return None
        return warm_in_background()

    def _begin(self, user_id: str, features: Assembled, prompt_version: str) -> _Call:
        started = time.perf_counter()
        version = self.resolve_version(user_id, prompt_version)
        prompt = self._registry[version]
        return _Call(started, version, prompt, self.model_for(version) or "", features)

    async def _request(self, user_id: str, call: _Call) -> LLMRequest:
        f = call.features
        tasks: Sequence[TaskView] = await self._tasks.open_tasks(user_id, f.now, MAX_TASKS)
        call.tasks_listed = min(len(tasks), MAX_TASKS)
        text = render_prompt(call.prompt, f, tasks, self._config.max_chars)
        return LLMRequest(call.model, text, call.prompt.temperature, call.prompt.max_tokens)

    def _finish(self, call: _Call, text: str, usage: Usage, reason: str) -> Generation:
        gen = Generation(
            text=pick_fallback(call.features) if reason else text,
            prompt_version=call.version,
            model=call.model,
            fallback=bool(reason),
            fallback_reason=reason,
            latency_ms=(time.perf_counter() - call.started) * 1000.0,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            generation_id=uuid.uuid4().hex,
        )
        log.info(
            "generate version=%s model=%s fallback=%s reason=%r latency_ms=%.1f "
            "tokens=%d/%d/%d tasks_listed=%d chars=%d id=%s",
            gen.prompt_version,
            gen.model or "-",
            gen.fallback,
            gen.fallback_reason,
            gen.latency_ms,
            gen.prompt_tokens,
            gen.completion_tokens,
            gen.total_tokens,
            call.tasks_listed,
            len(gen.text),
            gen.generation_id,
        )
        return gen

    async def generate(self, user_id: str, features: Assembled, prompt_version: str) -> Generation:
        """A tip for this user and context. Only an unknown prompt version raises."""
        call = self._begin(user_id, features, prompt_version)
        if not call.model:
            return self._finish(call, "", NO_USAGE, NO_MODEL)
        request = await self._request(user_id, call)
        try:
            completion = await self._gateway.complete(request)
        except LLMFailure as e:
            return self._finish(call, "", NO_USAGE, e.reason)
        text, reason = check_output(
            completion.text, self._config.max_chars, call.prompt.literal_lines()
        )
        return self._finish(call, text, completion.usage, reason)

    async def stream(
        self, user_id: str, features: Assembled, prompt_version: str
    ) -> AsyncGenerator[str | Generation, None]:
        """Text deltas as they arrive, then one authoritative `Generation` (module docstring)."""
        call = self._begin(user_id, features, prompt_version)
        if not call.model:
            gen = self._finish(call, "", NO_USAGE, NO_MODEL)
            yield gen.text
            yield gen
            return
        request = await self._request(user_id, call)
        max_chars = self._config.max_chars
        parts: list[str] = []
        usage = NO_USAGE
        reason = ""
        sent = False
        try:
            async with contextlib.aclosing(self._gateway.stream(request)) as chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if not chunk.delta:
                        continue
                    parts.append(chunk.delta)
                    # Cleaning only ever shortens the text's ends, so once the cleaned
                    # prefix is over the limit the whole text will be too.
                    if len(clean_output("".join(parts))) > max_chars:
                        reason = "output too long"
                        break
                    sent = True
                    yield chunk.delta
        except LLMFailure as e:
            reason = e.reason
        text = ""
        if not reason:
            text, reason = check_output("".join(parts), max_chars, call.prompt.literal_lines())
        gen = self._finish(call, text, usage, reason)
        if gen.fallback and not sent:
            yield gen.text
        yield gen

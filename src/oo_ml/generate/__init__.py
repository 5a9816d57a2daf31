"""Tip generation: versioned prompts, the LiteLLM gateway, and curated fallbacks.

    prompts.py    PromptVersion, REGISTRY, render_prompt, resolve_version, list_prompts
    gateway.py    LLMClient (Protocol), LiteLLMClient, Gateway (deadline, retries, slots)
    fallback.py   curated fallback tips by situation, output content checks
    generator.py  Generator and Generation: the Generate / GenerateStream flow

Importing this package does not import LiteLLM (seconds, ~170 MB); the first model call
or `Generator.warm()` does.
"""

from oo_ml.errors import LLMFailure, ProviderError
from oo_ml.generate.gateway import (
    Chunk,
    Completion,
    Gateway,
    LiteLLMClient,
    LLMClient,
    LLMRequest,
    Usage,
    warm_in_background,
)
from oo_ml.generate.generator import Generation, Generator
from oo_ml.generate.prompts import (
    REGISTRY,
    PromptRow,
    PromptVersion,
    check_config,
    list_prompts,
    render_prompt,
    resolve_version,
)

__all__ = [
    "REGISTRY",
    "Chunk",
    "Completion",
    "Gateway",
    "Generation",
    "Generator",
    "LLMClient",
    "LLMFailure",
    "LLMRequest",
    "LiteLLMClient",
    "PromptRow",
    "PromptVersion",
    "ProviderError",
    "Usage",
    "check_config",
    "list_prompts",
    "render_prompt",
    "resolve_version",
    "warm_in_background",
]

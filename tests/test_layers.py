"""The import rule of the layers (ADR 0010), checked by walking the source's imports.

- `domain/` imports nothing of `edge/`, `stores/`, `ingest/`, `generate/`, `app/`, `schema/`,
  and no generated module, directly or through another oo_ml module.
- `stores/` reaches no generated module but the state codec's `oo.state.v1.state_pb2`.
- `config.py` reaches no generated module (it learns no default from proto).
- `ingest/` reaches storage through the ports only: no `stores/` module.

The walk follows imports inside functions too (a lazy import is still an import).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "oo_ml"
STATE_CODEC = "oo_ml.stores.codec"
STATE_MESSAGE = "oo.state.v1.state_pb2"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_generated(name: str) -> bool:
    return name == "oo" or name.startswith("oo.") or name.endswith("_pb2") or "_pb2_" in name


@cache
def direct_imports(module: str) -> frozenset[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not is_generated(base):
                found.add(base)
            # `from oo_ml.domain import ope` imports the module oo_ml.domain.ope, and
            # `from oo.state.v1 import state_pb2` the generated module state_pb2.
            found.update(
                f"{base}.{a.name}"
                for a in node.names
                if f"{base}.{a.name}" in MODULES or is_generated(base)
            )
    return frozenset(found)


def closure(module: str) -> dict[str, str]:
    """Every module reached from `module`, each with the oo_ml module that imports it."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        for imported in direct_imports(current):
            if imported in seen:
                continue
            seen[imported] = current
            if imported in MODULES:
                todo.append(imported)
    return seen


def under(prefix: str) -> list[str]:
    return sorted(m for m in MODULES if m == prefix or m.startswith(prefix + "."))


def path_to(module: str, target: str, seen: dict[str, str]) -> str:
    chain = [target]
    while chain[-1] != module and chain[-1] in seen:
        chain.append(seen[chain[-1]])
    return " <- ".join(chain)


@pytest.mark.parametrize("module", under("oo_ml.domain"))
def test_the_domain_imports_no_adapter_and_no_generated_code(module: str) -> None:
    seen = closure(module)
    forbidden = ("edge", "stores", "ingest", "generate", "app", "schema")
    for target in seen:
        layer = target.split(".")[1] if target.startswith("oo_ml.") else ""
        assert layer not in forbidden, f"{module} reaches {path_to(module, target, seen)}"
        assert not is_generated(target), f"{module} reaches {path_to(module, target, seen)}"


@pytest.mark.parametrize("module", under("oo_ml.stores"))
def test_stores_reach_only_the_state_codec_message(module: str) -> None:
    seen = closure(module)
    for target in seen:
        if is_generated(target):
            assert target == STATE_MESSAGE and seen[target] == STATE_CODEC, (
                f"{module} reaches {path_to(module, target, seen)}"
            )
        assert not target.startswith(("oo_ml.edge", "oo_ml.ingest", "oo_ml.app")), (
            f"{module} reaches {path_to(module, target, seen)}"
        )


@pytest.mark.parametrize("module", under("oo_ml.ingest"))
def test_ingest_reaches_storage_through_the_ports_only(module: str) -> None:
    seen = closure(module)
    for target in seen:
        assert not target.startswith("oo_ml.stores"), (
            f"{module} reaches {path_to(module, target, seen)}"
        )


def test_config_learns_no_default_from_generated_code() -> None:
    seen = closure("oo_ml.config")
    generated = [t for t in seen if is_generated(t)]
    assert not generated, f"config reaches {path_to('oo_ml.config', generated[0], seen)}"


def test_the_walk_sees_imports() -> None:
    # Guard the guard: a walk that found nothing would pass every rule above.
    assert "oo_ml.domain.state" in closure("oo_ml.domain.engine.scoring")
    assert STATE_MESSAGE in closure("oo_ml.stores.sqlite.scoring")
    assert any(is_generated(t) for t in closure("oo_ml.edge.service"))

"""The rollout history: every gate verdict, promote or refuse, one JSON line each.

`oo-ml gate` (online and `--offline`) appends a record here (by default
`docs/policies/gate-history.jsonl`); `oo-ml cards` reads it into each policy's card.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("docs/policies/gate-history.jsonl")


def append(
    path: Path | str | None,
    *,
    mode: str,
    served: str,
    candidate: str,
    promote: bool,
    reason: str,
    figures: Mapping[str, Any],
    configuration: Mapping[str, Any],
    now: datetime | None = None,
) -> None:
    """Append one verdict (no-op when path is None or empty)."""
    if not path:
        return
    record = {
        "date": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "mode": mode,
        "served": served,
        "candidate": candidate,
        "verdict": "promote" if promote else "refuse",
        "reason": reason,
        "figures": dict(figures),
        "configuration": dict(configuration),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read(path: Path | str) -> list[dict[str, Any]]:
    """Every record of the history, oldest first ([] when there is none)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line]

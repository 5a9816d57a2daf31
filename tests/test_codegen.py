"""Drift gate: the committed `oo` package must be exactly what scripts/codegen.py writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "src" / "oo"
CODEGEN = ROOT / "scripts" / "codegen.py"


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path, leaving out Python's bytecode caches."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_generated_code_matches_committed(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(CODEGEN), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/codegen.py failed:\n{proc.stdout}\n{proc.stderr}"

    fresh = _files(tmp_path / "oo")
    committed = _files(COMMITTED)
    assert fresh, "scripts/codegen.py wrote no files"

    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    changed = sorted(k for k in fresh.keys() & committed.keys() if fresh[k] != committed[k])
    problems = (
        [f"  missing (not committed): src/oo/{k}" for k in missing]
        + [f"  stale (no longer generated): src/oo/{k}" for k in extra]
        + [f"  differs: src/oo/{k}" for k in changed]
    )
    assert not problems, (
        "src/oo is out of date with proto/ (or was edited by hand):\n"
        + "\n".join(problems)
        + "\nRun `make proto` and commit the result."
    )

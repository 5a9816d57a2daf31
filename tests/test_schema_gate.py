"""The schema gate: buf lint/format, breaking-change detection against the released image,
and feature-contract options flowing from .proto into Python with no Python edit."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from oo.scoring.v1 import scoring_pb2
from oo_ml.schema.contracts import ALL_FEATURES
from oo_ml.schema.validation import violations

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"
RELEASED = ROOT / "schema" / "released.binpb"
CODEGEN = ROOT / "scripts" / "codegen.py"
SIGNALS = Path("proto/oo/events/v1/signals.proto")
SCORING = Path("proto/oo/scoring/v1/scoring.proto")
BREAKING_EXIT = 100  # buf's exit code for "breaking changes found"


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert BUF.is_file(), f"buf not found at {BUF}; install the dev extra (buf-bin)"
    return _run([str(BUF), *args], cwd)


def _breaking(workspace: Path) -> tuple[int, list[dict[str, Any]], str]:
    """Run buf breaking in workspace against the released image: (exit code, findings, output)."""
    proc = _buf("breaking", "--against", str(RELEASED), "--error-format", "json", cwd=workspace)
    output = proc.stdout + proc.stderr
    findings = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, findings, output


def _replace_once(path: Path, old: str, new: str, *, after: str, until: str) -> None:
    """Replace the first `old` between the anchor `after` and the next `until`; fail when it
    is not there, so a drifting .proto cannot make a test pass vacuously."""
    text = path.read_text()
    start = text.index(after)
    end = text.index(until, start)
    at = text.find(old, start, end)
    assert at != -1, f"{old!r} not found between {after!r} and {until!r} in {path}"
    path.write_text(text[:at] + new + text[at + len(old) :])


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of the buf workspace (buf.yaml and proto/) to edit freely."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy2(ROOT / "buf.yaml", ws / "buf.yaml")
    shutil.copytree(ROOT / "proto", ws / "proto")
    return ws


# --- a. lint and format ------------------------------------------------------------------


def test_buf_lint_passes() -> None:
    proc = _buf("lint")
    assert proc.returncode == 0, f"buf lint failed:\n{proc.stdout}{proc.stderr}"


def test_buf_format_is_clean() -> None:
    proc = _buf("format", "-d", "--exit-code")
    assert proc.returncode == 0, (
        f"proto files are not buf-formatted (run `make proto`):\n{proc.stdout}{proc.stderr}"
    )


# --- b. breaking changes against the released image ---------------------------------------


def test_breaking_unmodified_copy_passes(workspace: Path) -> None:
    code, findings, output = _breaking(workspace)
    assert code == 0, f"the unmodified schema breaks the released image:\n{output}"
    assert findings == []


def test_breaking_catches_field_rename(workspace: Path) -> None:
    _replace_once(
        workspace / SIGNALS,
        "dwell_ms = 4",
        "dwell_millis = 4",
        after="message TipFeedback {",
        until="\n}\n",
    )
    code, findings, output = _breaking(workspace)
    assert code == BREAKING_EXIT, f"a renamed field was not flagged (exit {code}):\n{output}"
    named = [f for f in findings if "dwell_ms" in f["message"]]
    assert named, f"no finding names the renamed field dwell_ms:\n{output}"
    assert {f["type"] for f in named} >= {"FIELD_SAME_NAME"}, output
    assert all(f["path"] == SIGNALS.as_posix() for f in findings), output
    assert all("TipFeedback" in f["message"] for f in findings), output


def test_breaking_catches_field_renumber(workspace: Path) -> None:
    _replace_once(
        workspace / SIGNALS,
        "dwell_ms = 4",
        "dwell_ms = 9",
        after="message TipFeedback {",
        until="\n}\n",
    )
    code, findings, output = _breaking(workspace)
    assert code == BREAKING_EXIT, f"a renumbered field was not flagged (exit {code}):\n{output}"
    deleted = [f for f in findings if f["type"] == "FIELD_NO_DELETE"]
    assert deleted, f"field 4 of TipFeedback was not reported as deleted:\n{output}"
    assert any('"4"' in f["message"] and "dwell_ms" in f["message"] for f in deleted), output
    assert all(f["path"] == SIGNALS.as_posix() for f in findings), output


# --- c. option values reach Python through codegen alone ----------------------------------

_DUMP_CONTRACTS = """
import dataclasses, json
import oo, oo_ml.schema.contracts as c
from oo.scoring.v1 import scoring_pb2
from oo_ml.schema.validation import violations

def dump(f):
    return {**dataclasses.asdict(f), "dtype": f.dtype.name, "source": f.source.name}

print(json.dumps({
    "oo_file": oo.__file__,
    "contracts_file": c.__file__,
    "contracts": {name: dump(f) for name, f in c.ALL_FEATURES.items()},
    "preferred_hour_21": [
        v.field for v in violations(scoring_pb2.ProfileFeatures(preferred_hour=21))
    ],
}))
"""


def _contracts_in_process() -> dict[str, dict[str, Any]]:
    return {
        name: {**dataclasses.asdict(f), "dtype": f.dtype.name, "source": f.source.name}
        for name, f in ALL_FEATURES.items()
    }


def test_committed_contract_values_are_the_originals() -> None:
    assert ALL_FEATURES["completion_rate_30d"].fallback == 0.2
    assert ALL_FEATURES["preferred_hour"].max == 23
    assert violations(scoring_pb2.ProfileFeatures(preferred_hour=21)) == []


def test_option_edit_reaches_python_without_python_edit(workspace: Path) -> None:
    scoring = workspace / SCORING
    _replace_once(
        scoring, "fallback: 0.2", "fallback: 0.55", after="completion_rate_30d = 1 [", until="}];"
    )
    _replace_once(scoring, "max: 23", "max: 20", after="preferred_hour = 4 [", until="}];")

    gen = workspace / "gen"
    proc = _run(
        [sys.executable, str(CODEGEN), "--proto", str(workspace / "proto"), "--out", str(gen)],
        cwd=workspace,
    )
    assert proc.returncode == 0, f"codegen failed:\n{proc.stdout}\n{proc.stderr}"

    # gen/ first, so its `oo` shadows the committed src/oo; oo_ml itself is unchanged.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(gen), str(ROOT / "src")])}
    proc = _run([sys.executable, "-c", _DUMP_CONTRACTS], cwd=workspace, env=env)
    assert proc.returncode == 0, f"importing oo_ml.schema.contracts failed:\n{proc.stderr}"
    got = json.loads(proc.stdout.splitlines()[-1])

    assert Path(got["oo_file"]).is_relative_to(gen), f"oo was not shadowed: {got['oo_file']}"
    assert Path(got["contracts_file"]).is_relative_to(ROOT / "src"), got["contracts_file"]

    new = got["contracts"]
    assert new["completion_rate_30d"]["fallback"] == 0.55
    assert new["preferred_hour"]["max"] == 20
    # The rules derived from the contract follow it too.
    assert got["preferred_hour_21"] == ["preferred_hour"]

    # Nothing else moved: the edited copy differs from the committed contracts in
    # exactly those two values.
    expected = _contracts_in_process()
    expected["completion_rate_30d"]["fallback"] = 0.55
    expected["preferred_hour"]["max"] = 20
    assert new == expected

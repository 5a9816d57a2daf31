"""The offline gate (stage one of ADR 0013): `oo-ml gate --offline` decides on the lower
95% bound of the paired difference in value over seeds, exits non-zero when it refuses,
and appends every verdict to the gate history."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from oo_ml import cli
from oo_ml.domain import promotion

SMALL = ["--users", "20", "--rounds", "60", "--seeds", "4"]


def _gate(served: str, candidate: str, history: Path) -> int:
    argv = ["gate", "--offline", "--served", served, "--candidate", candidate, *SMALL]
    return cli.main([*argv, "--history", str(history)])


def test_offline_gate_refuses_uniform_over_egreedy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = tmp_path / "gate-history.jsonl"
    assert _gate("egreedy", "uniform", history) == 1
    out = capsys.readouterr().out
    assert "refuse uniform" in out
    (record,) = [json.loads(line) for line in history.read_text().splitlines()]
    assert record["verdict"] == "refuse" and record["mode"] == "offline"
    assert record["served"] == "egreedy" and record["candidate"] == "uniform"
    assert record["figures"]["value_ci"][0] < record["figures"]["value_ci"][1] < 0
    assert record["configuration"]["seeds"] == [1, 2, 3, 4]
    assert record["configuration"]["knobs"]["epsilon"] == 0.1
    assert record["date"]


def test_offline_gate_promotes_linucb_over_uniform(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = tmp_path / "gate-history.jsonl"
    assert _gate("uniform", "linucb", history) == 0
    assert "promote linucb" in capsys.readouterr().out
    # A second verdict is appended, not overwritten.
    assert _gate("uniform", "linucb", history) == 0
    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert [r["verdict"] for r in records] == ["promote", "promote"]
    assert records[0]["figures"]["value_ci"][0] > 0


def test_offline_gate_bad_arguments_exit_2(tmp_path: Path) -> None:
    history = tmp_path / "h.jsonl"
    assert _gate("egreedy", "nope", history) == 2
    argv = ["gate", "--offline", "--served", "egreedy", "--candidate", "linucb", "--seeds", "1"]
    assert cli.main([*argv, "--history", str(history)]) == 2
    assert not history.exists()


def test_paired_difference_and_its_rule() -> None:
    d = promotion.paired_difference("c", "i", [0.1, 0.12, 0.08, 0.1])
    assert d.mean == pytest.approx(0.1)
    # t(0.975, 3) = 3.182; sd = 0.01633
    assert d.ci_low == pytest.approx(0.1 - 3.1824 * 0.016330 / 2, abs=1e-4)
    assert promotion.promote_paired(d).promote
    assert not promotion.promote_paired(d, margin=0.1).promote
    one = promotion.paired_difference("c", "i", [0.5])
    assert math.isinf(one.ci_low) and not promotion.promote_paired(one).promote
    tie = promotion.paired_difference("c", "i", [0.0, 0.0, 0.0])
    assert not promotion.promote_paired(tie).promote

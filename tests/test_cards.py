"""Policy cards: the committed `docs/policies/<name>.md` are what `oo-ml cards` writes from
the code, the seeded simulation and the committed gate history."""

from __future__ import annotations

from pathlib import Path

import pytest

from oo_ml import cli
from oo_ml.cards import feature_inputs
from oo_ml.domain.policies import POLICIES
from oo_ml.schema.contracts import ALL_FEATURES

ROOT = Path(__file__).resolve().parent.parent
CARDS = ROOT / "docs" / "policies"
HISTORY = CARDS / "gate-history.jsonl"


def test_committed_cards_are_current(tmp_path: Path) -> None:
    assert cli.main(["cards", "--out", str(tmp_path), "--history", str(HISTORY)]) == 0
    for name in POLICIES:
        fresh = (tmp_path / f"{name}.md").read_text(encoding="utf-8")
        committed = (CARDS / f"{name}.md").read_text(encoding="utf-8")
        assert committed == fresh, f"docs/policies/{name}.md is stale: run .venv/bin/oo-ml cards"
    # --check agrees.
    argv = ["cards", "--out", str(CARDS), "--history", str(HISTORY), "--check"]
    assert cli.main(argv) == 0


def test_check_flags_a_stale_card(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "egreedy.md").write_text("old\n")
    argv = ["cards", "--out", str(tmp_path), "--history", str(HISTORY), "--check"]
    assert cli.main(argv) == 1
    assert "stale:" in capsys.readouterr().out


def test_cards_list_the_feature_contract_and_the_history() -> None:
    assert feature_inputs("v1", ALL_FEATURES) == [
        "hour_of_day",
        "day_of_week",
        "open_tasks",
        "overdue_tasks",
    ]
    assert "preferred_hour" in feature_inputs("v2", ALL_FEATURES)
    linucb = (CARDS / "linucb.md").read_text(encoding="utf-8")
    for part in ("## Inputs", "## Offline metrics", "## Fairness", "## Rollout history"):
        assert part in linucb
    assert "new users" in linucb and "`OO_LINUCB_ALPHA`" in linucb
    assert "**promote**" in linucb  # the recorded offline gate: linucb over uniform
    assert "**refuse**" in (CARDS / "uniform.md").read_text(encoding="utf-8")

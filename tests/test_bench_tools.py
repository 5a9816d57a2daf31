"""The bench's own arithmetic: gRPC framing, h2load output parsing, percentiles, profile
frames, and the FastAPI peer's bandit (which must really learn, or the comparison is moot).

No server and no timing: the bench's figures are never asserted here.
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from bench import h2load
from bench.fastapi_peer import Bandit, features
from bench.transport import top_frames


def test_grpc_frame_is_flag_length_message() -> None:
    framed = h2load.grpc_frame(b"abc")
    assert framed[:1] == b"\x00"
    assert struct.unpack(">I", framed[1:5]) == (3,)
    assert framed[5:] == b"abc"


def test_h2load_summary_and_log_parsing() -> None:
    out = (
        "finished in 1.00s, 100.00 req/s, 1KB/s\n"
        "requests: 100 total, 101 started, 100 done, 98 succeeded, 2 failed, 2 errored, 0 timeout\n"
        "status codes: 97 2xx, 0 3xx, 1 4xx, 0 5xx\n"
    )
    assert h2load.parse_summary(out) == (100, 97, 1, 2)
    log = "1700000000000000\t200\t450\n1700000000000500\t200\t1200\n"
    assert h2load.parse_log(log) == [450, 1200]


def test_percentile_is_nearest_rank() -> None:
    xs = list(range(1, 101))
    random.shuffle(xs)
    assert h2load.percentile(xs, 0.5) == 50
    assert h2load.percentile(xs, 0.99) == 99
    assert h2load.percentile(xs, 1.0) == 100
    assert h2load.percentile([], 0.5) == 0.0


def test_top_frames_counts_leaf_frames() -> None:
    raw = "main;a;b 3\nmain;a 1\nmain;c;b 2\n"
    top = top_frames(raw, 2)
    assert top[0] == {"frame": "b", "samples": 5, "own_pct": 500 / 6}
    assert top[1]["frame"] == "a"


def test_fastapi_peer_bandit_scores_and_learns() -> None:
    bandit = Bandit(seed=1)
    bandit.rng.random = lambda: 1.0  # type: ignore[method-assign]  # never explore
    cands = [(f"tip-{k}", f"arm-{k}") for k in range(10)]
    ctx = {"hour_of_day": 9, "day_of_week": 2}
    first = bandit.score("u", cands, ctx, {})
    assert sum(r["propensity"] for r in first["ranking"]) == pytest.approx(1.0)
    assert bandit.reward(first["decision_id"], 0.0) == {
        "applied": True,
        "arm": first["ranking"][0]["arm"],
    }
    assert bandit.reward(first["decision_id"], 0.0) is None  # once only
    x = features(ctx, {})
    assert x.shape == (12,)
    model = bandit.users["u"]
    for _ in range(5):
        model.update("arm-7", x, 1.0)
    after = bandit.score("u", cands, ctx, {})
    assert after["chosen_tip_id"] == "tip-7"
    assert after["ranking"][0]["tip_id"] == "tip-7"
    # A⁻¹ kept by Sherman–Morrison matches the inverse of λI + Σ x xᵀ.
    expected = np.linalg.inv(np.eye(12) + 5 * np.outer(x, x))
    assert np.allclose(model.a_inv[model.index["arm-7"]], expected)


def test_ablation_variants_name_a_piece_a_tree_and_a_spinner(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`bench.ablation` takes `piece[@tree][+spin]` and refuses unknown pieces and duties."""
    from bench import ablation

    seen = []
    monkeypatch.setattr(ablation, "run", lambda *a: seen.append(a))
    assert ablation.main(["--variants", "full@/tmp/old,full,noship+spin", "--spin", "0.2"]) == 0
    assert seen == [(["full@/tmp/old", "full", "noship+spin"], 3, 5.0, 0.2)]
    for bad in (
        ["--variants", "fast"],
        ["--variants", "nolog@/x+spin,spin"],
        ["--spin", "1", "--variants", "full"],
    ):
        with pytest.raises(SystemExit):
            ablation.main(bad)

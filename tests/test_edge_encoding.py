"""The Score response's shortcuts encode exactly what the plain way would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from oo.scoring.v1 import scoring_pb2 as pb
from oo_ml.domain.features import Inputs, assemble
from oo_ml.domain.rng import DecisionIds, decision_time
from oo_ml.edge.service import feature_bytes, feature_values
from oo_ml.schema.contracts import ALL_FEATURES


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 23),
    st.floats(0, 1),
    st.one_of(st.none(), st.floats(0, 86_400_000)),
    st.sampled_from(["", "Europe/Paris", "Asia/Tokyo"]),
)
def test_cached_feature_bytes_equal_the_messages(
    hour: int, rate: float, dwell: float | None, zone: str
) -> None:
    values: dict[str, float | None] = {"hour_of_day": float(hour), "completion_rate_30d": rate}
    values["mean_dwell_ms_30d"] = dwell
    assembled = assemble(ALL_FEATURES, Inputs(values, zone), {}, now=1_764_700_000.0)
    plain = pb.ScoreResponse(decision_id="d", features=feature_values(assembled))
    fast = pb.ScoreResponse(decision_id="d")
    for _ in range(2):  # the second time from the cache
        fast.ClearField("features")
        fast.MergeFromString(feature_bytes(assembled))
        assert fast.SerializeToString(deterministic=True) == plain.SerializeToString(
            deterministic=True
        )


def test_decision_ids_are_unique_hex_of_128_bits() -> None:
    ids = DecisionIds()
    drawn = [ids() for _ in range(2000)]  # across several blocks of 256
    assert len(set(drawn)) == len(drawn)
    assert all(len(d) == 32 and int(d, 16) >= 0 for d in drawn)
    assert DecisionIds()() not in drawn  # another instance draws its own bytes


def test_decision_ids_start_with_their_time() -> None:
    ids = DecisionIds(clock=lambda: 1_790_000_000.1234)
    a, b = ids(), ids()
    assert a[:12] == b[:12] == f"{1_790_000_000_123:012x}" and a[12:] != b[12:]
    assert decision_time(a) == 1_790_000_000.123
    assert decision_time("not-ours") is None and decision_time("z" * 32) is None

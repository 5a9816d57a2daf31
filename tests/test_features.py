"""Request-time assembly: request wins, then the source (clock, stores) while fresh, then the
contract's fallback. Every TTL and fallback comes from the proto contract."""

from __future__ import annotations

from datetime import UTC, datetime

from oo_ml.domain.features import Inputs, Origin, StoredValue, assemble
from oo_ml.schema.contracts import ALL_FEATURES

# Sunday 2026-11-22 23:30 UTC
NOW = datetime(2026, 11, 22, 23, 30, tzinfo=UTC).timestamp()


def test_missing_hour_and_day_come_from_the_clock_in_the_request_timezone() -> None:
    utc = assemble(ALL_FEATURES, Inputs({}), {}, now=NOW)
    assert (utc["hour_of_day"], utc["day_of_week"]) == (23, 6)
    tokyo = assemble(ALL_FEATURES, Inputs({}, timezone="Asia/Tokyo"), {}, now=NOW)  # Monday 08:30
    assert (tokyo["hour_of_day"], tokyo["day_of_week"]) == (8, 0)
    assert tokyo.origins["hour_of_day"] is Origin.SERVER_CLOCK


def test_request_value_always_wins() -> None:
    stored = {"open_tasks": StoredValue(9, NOW), "completion_rate_30d": StoredValue(0.9, NOW)}
    f = assemble(
        ALL_FEATURES,
        Inputs({"hour_of_day": 3.0, "open_tasks": 2.0, "completion_rate_30d": 0.1}),
        stored,
        now=NOW,
    )
    assert (f["hour_of_day"], f["open_tasks"], f["completion_rate_30d"]) == (3, 2, 0.1)
    assert {f.origins[n] for n in ("hour_of_day", "open_tasks", "completion_rate_30d")} == {
        Origin.REQUEST
    }


def test_stores_fill_gaps_while_fresh_then_the_fallback_applies() -> None:
    ttl = ALL_FEATURES["completion_rate_30d"].ttl_seconds
    fresh = {
        "completion_rate_30d": StoredValue(0.7, NOW - ttl + 60),
        "overdue_tasks": StoredValue(4, NOW),
    }
    f = assemble(ALL_FEATURES, Inputs({}), fresh, now=NOW)
    assert (
        f["completion_rate_30d"] == 0.7 and f.origins["completion_rate_30d"] is Origin.PROFILE_STORE
    )
    assert f["overdue_tasks"] == 4 and f.origins["overdue_tasks"] is Origin.TASK_STORE
    stale = {"completion_rate_30d": StoredValue(0.7, NOW - ttl - 60)}
    g = assemble(ALL_FEATURES, Inputs({}), stale, now=NOW)
    assert g["completion_rate_30d"] == ALL_FEATURES["completion_rate_30d"].fallback
    assert g.origins["completion_rate_30d"] is Origin.FALLBACK


def test_out_of_contract_stored_values_are_not_trusted() -> None:
    f = assemble(ALL_FEATURES, Inputs({}), {"dismiss_rate_30d": StoredValue(3.0, NOW)}, now=NOW)
    assert f.origins["dismiss_rate_30d"] is Origin.FALLBACK


def test_every_contracted_feature_is_assembled() -> None:
    f = assemble(ALL_FEATURES, Inputs({}), {}, now=NOW)
    assert set(f.values) == set(ALL_FEATURES)

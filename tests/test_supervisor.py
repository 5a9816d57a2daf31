"""The supervisor's start-up checks and its shutdown: every step runs, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from oo_ml import config as config_mod
from oo_ml.app.supervisor import App
from oo_ml.errors import TransientStoreError
from oo_ml.stores.sqlite import decision_writer


def app_in(tmp_path: Path, **env: str) -> App:
    settings = {"OO_PORT": "0", "OO_DATA_DIR": str(tmp_path / "data"), "OO_INGEST": "0", **env}
    return App(config_mod.load(env=settings))


async def test_a_failing_stop_step_does_not_skip_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_in(tmp_path)
    await app.start()
    assert app.engine is not None and app.generator is not None and app.store is not None
    closed: list[str] = []

    async def failing_close() -> None:
        raise RuntimeError("close failed (injected)")

    real_aclose = app.generator.aclose

    async def aclose() -> None:
        closed.append("generator")
        await real_aclose()

    app.engine.close = failing_close  # type: ignore[method-assign]
    app.generator.aclose = aclose  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected"):
        await app.stop()
    # The steps after the failing one ran: the generator's clients and the store are closed.
    assert closed == ["generator"]
    with pytest.raises(TransientStoreError, match="closed"):
        await app.store.commit([])
    assert "stopping the decision log failed" in caplog.text
    await app.stop()  # a second stop is safe and does nothing
    assert closed == ["generator"]


async def test_max_arms_below_the_proto_candidate_limit_refuses_to_start(tmp_path: Path) -> None:
    app = app_in(tmp_path, OO_MAX_ARMS="10")
    with pytest.raises(ValueError, match="OO_MAX_ARMS"):
        await app.start()


async def test_a_decision_writer_that_cannot_run_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child is started, and answers an empty batch, before the server listens: an
    interpreter that is not there fails the start with the reason and the way around
    it, instead of every flush after it."""
    monkeypatch.setattr(decision_writer.sys, "executable", str(tmp_path / "no-python"))
    app = app_in(tmp_path)
    with pytest.raises(
        RuntimeError, match=r"decision writer process cannot run.*OO_DECISION_WRITER=thread"
    ):
        await app.start()
    await app.stop()
    monkeypatch.undo()
    thread = app_in(tmp_path, OO_DECISION_WRITER="thread")  # the way around it
    await thread.start()
    await thread.stop()

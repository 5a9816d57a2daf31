"""Config: one frozen tree from OO_* variables and flags; a flag beats the environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from oo_ml import config as config_mod
from oo_ml.cli import main, parser


def test_defaults_env_and_flags() -> None:
    assert config_mod.load(env={}).scoring.default_policy == "egreedy"
    env = {
        "OO_POLICY": "linucb",
        "OO_PORT": "6000",
        "OO_DEFAULT_REWARD": "off",
        "OO_SHADOW_POLICIES": "lints, uniform",
    }
    cfg = config_mod.load(env=env)
    assert (cfg.scoring.default_policy, cfg.server.port) == ("linucb", 6000)
    assert cfg.scoring.default_reward is None
    assert cfg.scoring.shadow_policies == ("lints", "uniform")
    flags = parser().parse_args(
        ["serve", "--policy", "lints", "--data-dir", "/tmp/x", "--host", "0.0.0.0"]
    )
    cfg = config_mod.load(env=env, flags=flags)
    assert (cfg.scoring.default_policy, cfg.server.data_dir, cfg.server.host) == (
        "lints",
        Path("/tmp/x"),
        "0.0.0.0",
    )
    assert cfg.server.port == 6000  # no flag given: the environment stands
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OO_PORT": "http"}, "OO_PORT"),
        ({"OO_EPSILON": "1.5"}, "OO_EPSILON"),
        ({"OO_DEDUPE_WINDOW_S": "60"}, "24 h"),
        ({"OO_INGEST": "maybe"}, "OO_INGEST"),
        ({"OO_INGEST_BATCH": "10"}, "at least 100"),
        ({"OO_RIDGE_LAMBDA": "nan"}, "OO_RIDGE_LAMBDA"),
        ({"OO_REWARD_WINDOW_S": "nan"}, "OO_REWARD_WINDOW_S"),
        ({"OO_DEFAULT_REWARD": "2"}, "OO_DEFAULT_REWARD"),
        ({"OO_SNOOZED_REWARD": "nan"}, "OO_SNOOZED_REWARD"),
        ({"OO_MAX_ARMS": "10", "OO_MAX_CANDIDATES": "20"}, "OO_MAX_ARMS"),
    ],
)
def test_bad_settings_are_refused_with_their_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_mod.load(env=env)


def test_every_setting_is_in_serve_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for env, flag, _default, _help in config_mod.describe():
        assert env in out
        if flag:
            assert flag in out


def test_the_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for env, _flag, default, help_ in config_mod.describe():
        assert f"| `{env}` |" in readme, f"README lacks {env}: paste `oo-ml config` into it"
        assert help_ in readme and f"`{default}`" in readme


def test_config_into_a_closed_pipe_ends_quietly() -> None:
    # `oo-ml config | head`: the reader is gone before the table is written.
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "oo-ml"
    proc = subprocess.Popen([str(exe), "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # no reader left: the first write gets EPIPE
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=30) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err

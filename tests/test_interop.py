"""Interop with the recommender's own stack: a Node harness (tests/interop/recommender.mjs,
@grpc/grpc-js + @grpc/proto-loader, @nats-io/jetstream, protobufjs) drives a real
`oo-ml serve` process and a real nats-server, loading the repo's proto/ files.

Each scenario is one `node` subprocess; it exits 0 and prints a JSON summary line when every
check passed. node_modules is installed here with `npm ci` from the committed lock file
when it is missing or older than the lock file. This file uses nothing of oo_ml but the
`oo-ml` command and the test nats-server (tests/natsfix.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.natsfix import running_nats

ROOT = Path(__file__).resolve().parent.parent
HARNESS_DIR = ROOT / "tests" / "interop"
HARNESS = HARNESS_DIR / "recommender.mjs"
PROTO_DIR = ROOT / "proto"
INSTALLED = HARNESS_DIR / "node_modules" / ".package-lock.json"  # written by npm ci
NODE_HINT = "node >= 18 and npm are needed for the interop tests: apt-get install nodejs npm"
SCENARIO_TIMEOUT_S = 60.0
OO_ML = str(Path(sys.executable).parent / "oo-ml")


class NodeMissing(Exception):
    """node, npm or the harness's packages cannot be had; the message says how to fix it."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise NodeMissing(f"`{name}` not found on PATH. {NODE_HINT}")
    return path


def _prepare_node(say: Callable[[str], None]) -> str:
    """The node binary, with tests/interop/node_modules installed from the lock file."""
    node = _tool("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    match = re.match(r"v(\d+)", version.stdout.strip())
    if match is None or int(match.group(1)) < 18:
        raise NodeMissing(f"node {version.stdout.strip()} is too old. {NODE_HINT}")
    lock = HARNESS_DIR / "package-lock.json"
    if not INSTALLED.exists() or INSTALLED.stat().st_mtime < lock.stat().st_mtime:
        npm = _tool("npm")
        say("installing the Node interop harness (npm ci in tests/interop)")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=HARNESS_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise NodeMissing(f"npm ci failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return node


@pytest.fixture(scope="session")
def node(pytestconfig: pytest.Config) -> str | NodeMissing:
    """The node binary, or why there is none: each test then fails (never skips) with it."""
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:  # shown even though pytest captures output
        if capture is None:
            print(line, flush=True)
            return
        with capture.global_and_fixture_disabled():
            print(f"\n{line}", flush=True)

    try:
        return _prepare_node(say)
    except NodeMissing as e:
        return e


@dataclass
class Stack:
    grpc_address: str
    nats_url: str
    log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """nats-server with JetStream, and `oo-ml serve` on port 0 ingesting from it."""
    tmp = tmp_path_factory.mktemp("interop")
    loop = asyncio.new_event_loop()
    nats_cm = running_nats(tmp / "nats")
    nats = loop.run_until_complete(nats_cm.__aenter__())
    env = {k: v for k, v in os.environ.items() if not k.startswith("OO_")}
    env.update(OO_NATS_URL=nats.url, OO_INGEST="1")
    log = tmp / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [OO_ML, "serve", "--port", "0", "--data-dir", str(tmp / "data")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        assert match, f"oo-ml serve did not start: {line!r}\n{log.read_text()[-3000:]}"
        yield Stack(f"{match.group(1)}:{match.group(2)}", nats.url, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        loop.run_until_complete(nats_cm.__aexit__(None, None, None))
        loop.close()


@pytest.mark.parametrize("scenario", ["grpc", "events-binary", "events-json"])
def test_recommender_stack(scenario: str, node: str | NodeMissing, stack: Stack) -> None:
    if isinstance(node, NodeMissing):
        pytest.fail(str(node), pytrace=False)
    args = [node, str(HARNESS), scenario, "--grpc", stack.grpc_address]
    args += ["--nats", stack.nats_url, "--proto", str(PROTO_DIR)]
    started = time.monotonic()
    try:
        done = subprocess.run(
            args,
            cwd=HARNESS_DIR,
            capture_output=True,
            text=True,
            timeout=SCENARIO_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{scenario} ran past {SCENARIO_TIMEOUT_S} s; stderr:\n{e.stderr}")
    took = time.monotonic() - started
    if done.returncode != 0:
        pytest.fail(
            f"interop scenario {scenario} failed (exit {done.returncode}):\n{done.stderr}"
            f"\n--- stdout:\n{done.stdout[-2000:]}\n--- oo-ml log (tail):\n"
            f"{stack.log.read_text()[-2000:]}",
            pytrace=False,
        )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["scenario"] == scenario
    print(f"{scenario}: {took:.2f} s: {done.stdout.strip()}")

"""The README's "Calling it" section, run exactly as printed.

The server starts with the README's own command (`OO_ADMIN_TOKEN=change-me make run`, on a
free port and a temp data dir through OO_PORT and OO_DATA_DIR, which the Makefile honours).
The examples run in POSIX `sh` from the repository root, with nothing set but what the block
sets itself and OO_PORT. Each command's output (stdout and stderr) must contain its `# ->`
line: whitespace is ignored, and `...` stands for any text (ids, scores).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = "@@@ README command"


@dataclass
class Example:
    command: str
    expected: list[str] = field(default_factory=list)


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def examples(block: str) -> list[Example]:
    out: list[Example] = []
    pending = ""
    for line in block.splitlines():
        if line.startswith("# -> "):
            out[-1].expected.append(line[len("# -> ") :])
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            continue  # a continued line
        out.append(Example(pending))
        pending = ""
    return out


def squeeze(s: str) -> str:
    return re.sub(r"\s+", "", s)


def contains(output: str, expected: str) -> bool:
    """Whether output holds expected's pieces (split at "...") in order, spaces aside."""
    at = 0
    text = squeeze(output)
    for piece in squeeze(expected).split("..."):
        found = text.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_examples_parse() -> None:
    # Guard the guard: an empty parse would pass everything below.
    calling = section(README.read_text(), "Calling it")
    start, block = sh_blocks(calling)
    assert "make run" in start
    found = examples(block)
    assert len(found) >= 12 and sum(bool(e.expected) for e in found) >= 10
    assert contains('{\n  "a": 1,\n  "b": "xyz"\n}', '{"a": 1, "b": "..."}')
    assert not contains('{"a": 2}', '{"a": 1}')


def test_every_calling_it_example_runs_as_printed(tmp_path: Path) -> None:
    calling = section(README.read_text(), "Calling it")
    start, block = sh_blocks(calling)
    server_command = start.split("#", 1)[0].strip()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OO_")}
    env.update(OO_PORT=str(port), OO_DATA_DIR=str(tmp_path / "data"))
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        ["sh", "-c", server_command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,  # make and its oo-ml child stop together
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if "listening on" in line:
                break
        else:
            pytest.fail(f"server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        found = examples(block)
        # Markers between the commands split the output; each marker carries the exit
        # status of the command before it. The commands themselves are as printed.
        script = "exec 2>&1\n" + "".join(
            f'echo "{MARK} {i} $?"\n{e.command}\n' for i, e in enumerate(found)
        )
        script += f'echo "{MARK} end $?"\n'
        clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OO_PORT": str(port)}
        run = subprocess.run(
            ["sh", "-c", script],
            check=False,  # each command's status is checked below
            cwd=ROOT,
            env=clean,
            capture_output=True,
            text=True,
            timeout=120,
        )
        parts = re.split(rf"^{MARK} \S+ (\d+)\n", run.stdout, flags=re.M)
        # parts: ["", status, out0, status, out1, ..., status_end, ""]
        outputs = parts[2::2]
        statuses = [int(s) for s in parts[1::2]][1:]  # the status after each command
        assert len(outputs) == len(found) + 1, run.stdout[-3000:]
        for example, output, status in zip(found, outputs, statuses, strict=False):
            for expected in example.expected:
                assert contains(output, expected), (
                    f"`{example.command}` printed:\n{output}\nwhich lacks:\n{expected}"
                )
            bad_request = "invalid_argument" in "".join(example.expected)
            # buf curl exits with 8 x the gRPC code on an error: INVALID_ARGUMENT is 24.
            assert status == (24 if bad_request else 0), f"`{example.command}` exited {status}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
        log.close()

"""Driving h2load (nghttp2's HTTP/2 and HTTP/1.1 load generator) against any server.

One load generator for every server under comparison, written in C and event-driven, so
it is not the bottleneck (`bench.transport` reports its CPU per request as evidence).
h2load sends one request body per process, so a "slot" here is one h2load process with
its own body (its own user); several slots run at once and their counts are summed. A
slot may run several h2load segments back to back, each with another body, to touch more
distinct users per measurement.

h2load counts HTTP statuses only: a gRPC error is an HTTP 200 with `grpc-status` in the
trailers. Callers must check each body with a real gRPC call before measuring with it.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
JSON_HEADERS = ("content-type: application/json",)


def ensure_h2load() -> str:
    """Return h2load's path, installing Debian's nghttp2-client first when it is missing."""
    found = shutil.which("h2load")
    if found:
        return found
    print("h2load is not on PATH: installing Debian's nghttp2-client", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    for cmd in (
        [*sudo, "apt-get", "update"],
        [*sudo, "apt-get", "install", "-y", "nghttp2-client"],
    ):
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    found = shutil.which("h2load")
    if not found:
        raise SystemExit("h2load is still missing after installing nghttp2-client")
    return found


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, bytes."""
    return struct.pack(">BI", 0, len(message)) + message


@dataclass
class Segment:
    """One h2load process: one body, `connections` connections with one stream each."""

    url: str
    body: bytes
    headers: tuple[str, ...]
    h1: bool = False
    connections: int = 1
    rps: float | None = None  # per connection; None: as fast as it answers


@dataclass
class Result:
    """Summed over the slots of one measurement."""

    requests: int = 0
    ok_2xx: int = 0
    non_2xx: int = 0
    failed: int = 0
    wall_s: float = 0.0
    h2load_cpu_s: float = 0.0
    latencies_us: list[int] = field(default_factory=list)
    segments: int = 0

    @property
    def qps(self) -> float:
        return self.ok_2xx / self.wall_s if self.wall_s else 0.0

    def pct_ms(self, q: float) -> float:
        return percentile(self.latencies_us, q) / 1000.0


def percentile(sorted_or_not: list[int], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a list of numbers; 0 for an empty list."""
    if not sorted_or_not:
        return 0.0
    xs = sorted(sorted_or_not)
    rank = max(1, int(-(-q * len(xs) // 1)))  # ceil(q * n), at least 1
    return float(xs[min(rank, len(xs)) - 1])


def parse_log(text: str) -> list[int]:
    """Request durations (µs) from an h2load --log-file: start µs, status, duration µs."""
    out = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].strip().lstrip("-").isdigit():
            out.append(int(parts[2]))
    return out


_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_REQS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed"
)


def parse_summary(text: str) -> tuple[int, int, int, int]:
    """(done, 2xx, non-2xx, failed) from h2load's summary on stdout."""
    r = _REQS.search(text)
    s = _STATUS.search(text)
    if not r or not s:
        raise RuntimeError(f"unexpected h2load output:\n{text[-2000:]}")
    twoxx, three, four, five = (int(g) for g in s.groups())
    return int(r.group(3)), twoxx, three + four + five, int(r.group(5))


def _command(h2load: str, seg: Segment, seconds: float, body: Path, log: Path) -> list[str]:
    cmd = [
        h2load,
        "-c",
        str(seg.connections),
        "-m",
        "1",
        "-t",
        "1",
        "-D",
        f"{max(1, round(seconds * 1000))}ms",
        "-d",
        str(body),
        "--log-file",
        str(log),
    ]
    if seg.h1:
        cmd.append("--h1")
    if seg.rps:
        cmd += ["--rps", f"{seg.rps:g}"]
    for h in seg.headers:
        cmd += ["-H", h]
    cmd.append(seg.url)
    return cmd


def example_command(seg: Segment, seconds: float) -> str:
    """The command line one slot runs, for the report."""
    return " ".join(
        repr(a) if " " in a else a
        for a in _command("h2load", seg, seconds, Path("BODY"), Path("LOG"))
    )


def run(slots: list[list[Segment]], seconds: float, h2load: str = "h2load") -> Result:
    """Run every slot at once for `seconds`; a slot's segments split its time equally.

    QPS is 2xx answers over the wall time of the whole measurement, so the short gaps
    between a slot's segments count against it, not for it. The CPU time of the h2load
    processes comes from RUSAGE_CHILDREN, which only they change here.
    """
    res = Result()
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        tmpdir = Path(tmp)

        def slot_thread(i: int, segs: list[Segment]) -> None:
            each = seconds / len(segs)
            for j, seg in enumerate(segs):
                body, log = tmpdir / f"{i}-{j}.body", tmpdir / f"{i}-{j}.log"
                body.write_bytes(seg.body)
                out = subprocess.run(
                    _command(h2load, seg, each, body, log),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"h2load failed ({out.returncode}): {out.stderr[-2000:]}")
                done, ok, bad, failed = parse_summary(out.stdout)
                lat = parse_log(log.read_text())
                with lock:
                    res.requests += done
                    res.ok_2xx += ok
                    res.non_2xx += bad
                    res.failed += failed
                    res.latencies_us.extend(lat)
                    res.segments += 1

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        errors: list[BaseException] = []

        def guarded(i: int, segs: list[Segment]) -> None:
            try:
                slot_thread(i, segs)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=(i, segs)) for i, segs in enumerate(slots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        res.wall_s = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if errors:
            raise errors[0]
    res.h2load_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return res

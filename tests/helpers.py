"""Test helpers: polling for eventual effects, reading rich gRPC errors, server processes."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from oo.scoring.v1.scoring_pb2 import FeatureOrigin, FeatureValue, StatsResponse

T = TypeVar("T")


async def assert_eventually(
    check: Callable[[], Awaitable[T]], within: float = 10.0, interval: float = 0.02
) -> T:
    """Call check until it returns without AssertionError, or re-raise its last failure."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


def assert_same_learning(before: StatsResponse, after: StatsResponse) -> None:
    """Two Stats replies for one user say the same about what it learned and what it is.
    The features read from the server's clock (hour, weekday) may differ, and each arm's
    estimate is theta . x at the current features: estimates are compared only when the
    clock's features did not move between the replies (every time, unless an hour turned
    in between)."""
    a, b = StatsResponse(), StatsResponse()
    a.CopyFrom(before)
    b.CopyFrom(after)
    clock_moved = _clock_features(a) != _clock_features(b)
    for stats in (a, b):
        kept = [f for f in stats.features if f.origin != FeatureOrigin.FEATURE_ORIGIN_SERVER_CLOCK]
        del stats.features[:]
        stats.features.extend(kept)
        stats.server = ""  # the answering process, a new one after a restart
        if clock_moved:
            for arm in stats.arms:
                arm.estimate = 0.0
    assert a == b


def _clock_features(stats: StatsResponse) -> list[FeatureValue]:
    return [f for f in stats.features if f.origin == FeatureOrigin.FEATURE_ORIGIN_SERVER_CLOCK]


def field_violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations carried by an error, by field."""
    out: dict[str, str] = {}
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                out.update({v.field: v.description for v in bad.field_violations})
    return out


class ServerProcess:
    """`oo-ml serve` in a subprocess; reads the bound port from its first stdout line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not match:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"server did not start: {line!r}\n{err[-3000:]}")
        self.address = f"{match.group(1)}:{match.group(2)}"

    def stop(self, sig: int, timeout: float = 30.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> str:
        """Kill the process if it still runs, close its pipes, and return its stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        return err

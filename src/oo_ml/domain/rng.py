"""The decision RNG: every random draw of a decision derives from its decision id.

The same id (and salt) always gives the same draws, so a decision replays exactly from
its log: the server, the simulator and the shadows all draw through here.

Draws are counter-based: block `i` of uniforms is BLAKE2b(salt:id, i), eight 64-bit words
a block, taken in order. A decision needs one to a dozen draws, so this costs a hash or
two (about a microsecond) where building a NumPy Generator per decision cost six. Large
batches of normals (Monte Carlo) are drawn by a Philox generator keyed by the next word,
so they replay too.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

_WORDS = struct.Struct("<8Q")
_TO_UNIT = 2.0**-53
# Above this many normals, one keyed Philox generator is cheaper than hashing.
_HASHED_NORMALS = 32


class Random(Protocol):
    """The draws a policy may make (a subset of numpy's Generator, same semantics)."""

    def random(self) -> float: ...

    def integers(self, high: int) -> int: ...

    def standard_normal(self, size: int | tuple[int, ...]) -> npt.NDArray[np.float64]: ...


class DecisionRandom:
    __slots__ = ("_block", "_i", "_seed", "_words")

    def __init__(self, decision_id: str, salt: str = "") -> None:
        self._seed = f"{salt}:{decision_id}".encode()
        self._block = 0
        self._words: tuple[int, ...] = ()
        self._i = 0

    def _word(self) -> int:
        if self._i == len(self._words):
            digest = hashlib.blake2b(
                self._seed + self._block.to_bytes(8, "little"), digest_size=64
            ).digest()
            self._words = _WORDS.unpack(digest)
            self._block += 1
            self._i = 0
        w = self._words[self._i]
        self._i += 1
        return w

    def random(self) -> float:
        """A uniform in [0, 1) with 53 random bits."""
        return (self._word() >> 11) * _TO_UNIT

    def integers(self, high: int) -> int:
        """A uniform integer in [0, high)."""
        if high < 1:
            raise ValueError(f"high must be >= 1 (got {high})")
        return min(int(self.random() * high), high - 1)

    def standard_normal(self, size: int | tuple[int, ...]) -> npt.NDArray[np.float64]:
        shape = (size,) if isinstance(size, int) else size
        count = math.prod(shape)
        if count > _HASHED_NORMALS:
            gen = np.random.Generator(np.random.Philox(key=self._word()))
            return gen.standard_normal(shape)
        # Box-Muller on pairs of uniforms; 1 - u keeps the log's argument in (0, 1].
        out = np.empty(count + (count & 1))
        for j in range(0, len(out), 2):
            r = math.sqrt(-2.0 * math.log(1.0 - self.random()))
            t = 2.0 * math.pi * self.random()
            out[j], out[j + 1] = r * math.cos(t), r * math.sin(t)
        return out[:count].reshape(shape)


class DecisionIds:
    """Decision ids: 32 hex digits, the first 12 the time of the decision in milliseconds
    (as in UUIDv7), the other 20 random (80 bits, unguessable). The time lets a process
    that does not find a decision tell whether another worker or replica may still hold
    it in its write-behind buffer (`decision_time`). The random part is drawn from the OS
    in blocks: one `os.urandom` system call per 256 ids instead of one per id (uuid4's),
    which costs tens of microseconds on some virtual machines."""

    __slots__ = ("_block", "_clock", "_i")
    _IDS = 256

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._block = ""
        self._i = 0
        self._clock = clock

    def __call__(self) -> str:
        if self._i == len(self._block):
            self._block = os.urandom(10 * self._IDS).hex()
            self._i = 0
        start = self._i
        self._i += 20
        return f"{int(self._clock() * 1000) & _MS_MASK:012x}{self._block[start : self._i]}"


_MS_MASK = (1 << 48) - 1


def decision_time(decision_id: str) -> float | None:
    """When a `DecisionIds` id was drawn (seconds since the epoch); None for an id of
    another shape (older ids were 32 random hex digits: their "time" is then arbitrary,
    which only costs a short wait, see `ScoringEngine.reward`)."""
    if len(decision_id) != 32:
        return None
    try:
        return int(decision_id[:12], 16) / 1000.0
    except ValueError:
        return None


def rng_for(decision_id: str, salt: str = "") -> DecisionRandom:
    """The decision's RNG: the same id (and salt) always gives the same draws."""
    return DecisionRandom(decision_id, salt)

"""The decision RNG: every random draw of a decision derives from its decision id.

The same id (and salt) always gives the same draws, so a decision replays exactly from
its log: the server, the simulator and the shadows all draw through here.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(decision_id: str, salt: str = "") -> np.random.Generator:
    """The decision's RNG: the same id (and salt) always gives the same draws."""
    seed = int.from_bytes(hashlib.blake2b(f"{salt}:{decision_id}".encode(), digest_size=8).digest())
    return np.random.default_rng(seed)

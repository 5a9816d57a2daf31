"""What a prior refresh reads: decode (and encode) 2,000 ten-arm v2 learned states.

`python -m bench.state_codec [--rounds N]` prints the medians over rounds; run it with
another tree first on PYTHONPATH to compare codecs in the same minutes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import oo_ml
from oo_ml.domain.state import PolicyState, empty_state
from oo_ml.stores.codec import decode_state, encode_state

ARMS = [f"arm-{i}" for i in range(10)]


def states(users: int) -> list[PolicyState]:
    """Ten arms, five of them rewarded: dense A^-1 arrays, as a served user's are."""
    out = []
    for u in range(users):
        state = empty_state("linucb", "v2", 12, 1.0).with_arms(ARMS)
        rng = np.random.default_rng(u)
        for arm in ARMS[:5]:
            state = state.learned(arm, rng.random(12), float(rng.random() < 0.3))
        out.append(state)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    made = states(args.users)
    blobs = [encode_state(s) for s in made]
    decode, encode = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for b in blobs:
            decode_state(b)
        decode.append(time.perf_counter() - t)
        t = time.perf_counter()
        for s in made:
            encode_state(s)
        encode.append(time.perf_counter() - t)
    print(
        f"{oo_ml.__file__}: {args.users} states of {len(blobs[0])} bytes:"
        f" decode {1e3 * statistics.median(decode):.0f} ms,"
        f" encode {1e3 * statistics.median(encode):.0f} ms (medians of {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()

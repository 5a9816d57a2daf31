"""Run benchmark parts: `python -m bench [transport|score|generate|ingest|codec ...]` (all by default).

`transport` (bench/transport.py, what `make bench` runs) takes its own options when run as
`python -m bench.transport`; here it runs with its defaults.
"""

from __future__ import annotations

import importlib
import sys

PARTS = {
    "transport": "bench.transport",
    "score": "bench.score",
    "generate": "bench.generate_isolation",
    "ingest": "bench.ingest",
    "codec": "bench.codec_compare",
}


def main() -> None:
    wanted = sys.argv[1:] or list(PARTS)
    for name in wanted:
        module = importlib.import_module(PARTS[name])
        print(f"\n=== {name} ===", flush=True)
        sys.argv = [module.__name__]
        module.main()


if __name__ == "__main__":
    main()

r"""Decode speed of one ~105-byte oo.events.v1.Envelope: upb protobuf runtime vs betterproto2.

The evidence behind ADR 0001 (docs/adr/0001-codegen-and-runtime.md). The upb side uses the
committed stubs in src/oo; the betterproto2 side uses classes generated into a throwaway
directory. betterproto2 is NOT a project dependency: reproduce its side in a throwaway venv
outside the repo (run from the repo root):

    python3.11 -m venv /tmp/bp2venv
    /tmp/bp2venv/bin/pip install 'betterproto2==0.10.0' 'betterproto2-compiler==0.10.1' \
        'grpcio-tools==1.85.1'
    WKT=$(/tmp/bp2venv/bin/python -c 'import grpc_tools; print(grpc_tools.__path__[0])')/_proto
    rm -rf /tmp/bp2out && mkdir /tmp/bp2out
    PATH=/tmp/bp2venv/bin:$PATH /tmp/bp2venv/bin/python -m grpc_tools.protoc -Iproto -I"$WKT" \
        --python_betterproto2_out=/tmp/bp2out $(cd proto && find oo -name '*.proto' | sort)
    /tmp/bp2venv/bin/python bench/codec_compare.py --betterproto-dir /tmp/bp2out

grpcio-tools 1.85.1 pulls in the same protobuf 7.x (upb) as the project, so both columns come
from one interpreter. Without --betterproto-dir (e.g. `.venv/bin/python
bench/codec_compare.py`) only the upb side is measured.

Two rows are reported: "decode" is the parse call alone; "decode + read all fields" also
reads every field, which is fairer because upb creates Python objects for fields lazily.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
import timeit
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The generated `oo` package lives in src/; make it importable from any interpreter.
sys.path.insert(0, str(ROOT / "src"))

from google.protobuf import __version__ as protobuf_version  # noqa: E402
from google.protobuf.internal import api_implementation  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from oo.events.v1 import envelope_pb2, signals_pb2  # noqa: E402

BP2_PACKAGE = "_bp2gen"

# Field values chosen so the serialized Envelope is 105 bytes.
EVENT_ID = "01JD7X4K9QF2M8W3R5T6Y7Z8AB"
SCHEMA_VERSION = "v1"
PRODUCER = "ios/4.2.0"
OCCURRED_SECONDS = 1_795_345_200
OCCURRED_NANOS = 123_000_000
USER_ID = "usr_7f3c9a21"
DECISION_ID = "dec_9F2KQ7M4XT3BZ"
TIP_ID = "tip_0042"
DWELL_MS = 4200


def make_payload() -> bytes:
    env = envelope_pb2.Envelope(
        event_id=EVENT_ID,
        schema_version=SCHEMA_VERSION,
        producer=PRODUCER,
        occurred_at=Timestamp(seconds=OCCURRED_SECONDS, nanos=OCCURRED_NANOS),
        user_id=USER_ID,
        tip_feedback=signals_pb2.TipFeedback(
            decision_id=DECISION_ID,
            tip_id=TIP_ID,
            action=signals_pb2.TIP_ACTION_COMPLETED,
            dwell_ms=DWELL_MS,
        ),
    )
    return env.SerializeToString()


def load_betterproto(out_dir: Path) -> ModuleType:
    """Import the oo.events.v1 module of a betterproto2-generated tree under a private name.

    betterproto2 emits relative imports up to the output directory (`from ....message_pool`),
    so the directory itself is loaded as a package; its `oo` never clashes with src/oo.
    """
    init = out_dir / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"{out_dir} is not a betterproto2 output directory (no __init__.py)")
    spec = importlib.util.spec_from_file_location(
        BP2_PACKAGE, init, submodule_search_locations=[str(out_dir)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {out_dir}")
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[BP2_PACKAGE] = pkg
    spec.loader.exec_module(pkg)
    try:
        return importlib.import_module(f"{BP2_PACKAGE}.oo.events.v1")
    except ModuleNotFoundError as exc:
        if exc.name == "betterproto2":
            raise SystemExit(
                "betterproto2 is not installed in this interpreter; run this script with the "
                "throwaway venv's python (see the module docstring)"
            ) from exc
        raise


def upb_read_all(decode: Callable[[bytes], Any], data: bytes) -> tuple[Any, ...]:
    m = decode(data)
    ts = m.occurred_at
    fb = m.tip_feedback
    return (
        m.event_id,
        m.schema_version,
        m.producer,
        ts.seconds,
        ts.nanos,
        m.user_id,
        fb.decision_id,
        fb.tip_id,
        fb.action,
        fb.dwell_ms,
    )


def bp2_read_all(decode: Callable[[bytes], Any], data: bytes) -> tuple[Any, ...]:
    # betterproto2 unwraps google.protobuf.Timestamp to a datetime.
    m = decode(data)
    fb = m.tip_feedback
    return (
        m.event_id,
        m.schema_version,
        m.producer,
        m.occurred_at,
        m.user_id,
        fb.decision_id,
        fb.tip_id,
        fb.action,
        fb.dwell_ms,
    )


def check_betterproto(bp2: ModuleType, data: bytes) -> None:
    """Fail loudly unless betterproto2 decodes the same values and re-encodes the same bytes."""
    m = bp2.Envelope.parse(data)
    fb = m.tip_feedback
    got = (m.event_id, m.schema_version, m.producer, m.user_id, fb.decision_id, fb.tip_id)
    want = (EVENT_ID, SCHEMA_VERSION, PRODUCER, USER_ID, DECISION_ID, TIP_ID)
    if got != want or int(fb.action) != signals_pb2.TIP_ACTION_COMPLETED or fb.dwell_ms != DWELL_MS:
        raise SystemExit(f"betterproto2 decoded different values: {m!r}")
    ts = m.occurred_at
    if int(ts.timestamp()) != OCCURRED_SECONDS or ts.microsecond * 1000 != OCCURRED_NANOS:
        raise SystemExit(f"betterproto2 decoded a different occurred_at: {ts!r}")
    if bytes(m) != data:
        print("note: betterproto2 re-encodes to different bytes (decode values match)")


def per_call_us(stmt: str, env: dict[str, Any], args: argparse.Namespace) -> float:
    """Best-of-`repeat` time per call in µs, each repeat running for about `min_time` seconds."""
    timer = timeit.Timer(stmt, globals=env)
    number, elapsed = timer.autorange()
    number = max(number, int(number * args.min_time / max(elapsed, 1e-9)))
    best = min(timer.repeat(repeat=args.repeat, number=number))
    return best / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--betterproto-dir",
        type=Path,
        help="output directory of protoc-gen-python_betterproto2 for proto/ (optional)",
    )
    parser.add_argument("--repeat", type=int, default=7, help="timeit repeats; the best is kept")
    parser.add_argument(
        "--min-time", type=float, default=0.5, help="seconds each repeat runs for (about)"
    )
    args = parser.parse_args(argv)

    data = make_payload()
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"protobuf {protobuf_version} (implementation: {api_implementation.Type()})")
    print(f"message: oo.events.v1.Envelope{{tip_feedback}}, {len(data)} bytes serialized")

    upb_decode = envelope_pb2.Envelope.FromString
    rows: list[tuple[str, float, float | None]] = []
    upb_plain = per_call_us("decode(data)", {"decode": upb_decode, "data": data}, args)
    upb_full = per_call_us(
        "read_all(decode, data)",
        {"read_all": upb_read_all, "decode": upb_decode, "data": data},
        args,
    )

    bp2_plain = bp2_full = None
    if args.betterproto_dir is None:
        print("betterproto2: skipped (pass --betterproto-dir; see the module docstring)")
    else:
        bp2 = load_betterproto(args.betterproto_dir.resolve())
        print(f"betterproto2 {metadata.version('betterproto2')} from {args.betterproto_dir}")
        check_betterproto(bp2, data)
        bp2_decode = bp2.Envelope.parse
        bp2_plain = per_call_us("decode(data)", {"decode": bp2_decode, "data": data}, args)
        bp2_full = per_call_us(
            "read_all(decode, data)",
            {"read_all": bp2_read_all, "decode": bp2_decode, "data": data},
            args,
        )
    rows.append(("decode", upb_plain, bp2_plain))
    rows.append(("decode + read all fields", upb_full, bp2_full))

    print(f"timeit: best of {args.repeat} repeats, ~{args.min_time}s each; µs per message")
    print()
    print(f"{'case':<26} {'upb µs':>10} {'betterproto2 µs':>16} {'ratio':>8}")
    for name, upb_us, bp2_us in rows:
        bp2_col = f"{bp2_us:16.2f}" if bp2_us is not None else f"{'skipped':>16}"
        ratio = f"{bp2_us / upb_us:7.1f}x" if bp2_us is not None else f"{'-':>8}"
        print(f"{name:<26} {upb_us:10.3f} {bp2_col} {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

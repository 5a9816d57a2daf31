"""Logging: JSON or text lines carrying the call's request id, and rate-limited client errors.

- `request_id` is a contextvar the edge guard sets at the start of each call (the client's
  `x-request-id` when it is sane, else a fresh one) and sends back as initial metadata; a
  filter on the handler copies it into every record logged inside the call, so a log line
  can be matched with the answer the client got.
- `configure("json" | "text", level)` replaces `logging.basicConfig`: one handler on
  stderr. JSON lines have `ts`, `level`, `logger`, `msg`, `request_id` (when in a call),
  any `extra=` fields, and `exc` (the traceback) only when a record has one.
- `ClientErrors` logs client errors (bad input, bad token...) at most once per kind per
  interval, with the count of what it suppressed since the last line. A client error never
  logs a traceback: only INTERNAL errors (bugs) do, from the guard.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "oo_request_id", default=None
)

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
# Generated ids: a random per-process prefix and a counter (no syscall per call).
_PREFIX = os.urandom(6).hex()
_NEXT = itertools.count(1).__next__


def sane_request_id(raw: str | bytes | None) -> str:
    """The client's id when it is short and printable, else a new random one."""
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if raw and _SANE_ID.fullmatch(raw):
        return raw
    return f"{_PREFIX}-{_NEXT():x}"


class RequestIdFilter(logging.Filter):
    """Copies the current call's request id onto the record (None outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


# The attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool)) else repr(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class WorkerFilter(logging.Filter):
    """Marks every record with the worker index of `oo-ml serve --workers N`: the workers
    share the parent's stderr, and a line must say which of them wrote it."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def configure(
    fmt: str = "json", level: int | str = logging.INFO, worker: int | None = None
) -> None:
    """One stderr handler with the request-id filter, in `json` or `text`; `worker` (in a
    worker process) adds a `worker` field, shown in text lines as `wN`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if worker is not None:
        handler.addFilter(WorkerFilter(worker))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        text = TEXT_FORMAT if worker is None else TEXT_FORMAT.replace(" [", " w%(worker)s [", 1)
        handler.setFormatter(logging.Formatter(text))
    else:
        raise ValueError(f"unknown log format {fmt!r} (json or text)")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def default_format() -> str:
    """JSON when stderr is not a terminal (a container, a service manager), else text."""
    return "text" if sys.stderr.isatty() else "json"


class ClientErrors:
    """Logs client errors at most once per kind per `interval_s`, with the suppressed count."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.log = logger
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def __call__(self, method: str, code: str, message: str) -> None:
        key = (method, code)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        self.log.info(
            "client error on %s: %s: %s (%d more like it suppressed in the last %gs)",
            method,
            code,
            message[:200],
            suppressed,
            self.interval_s,
            extra={"method": method, "code": code, "suppressed": suppressed},
        )

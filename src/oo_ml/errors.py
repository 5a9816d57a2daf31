"""The one error tree of oo-ml. `edge.interceptors` maps each error to one gRPC status by a
table keyed by class (the nearest listed ancestor wins), so a new error is a new row, never
a new branch.

    OoError                        (INTERNAL)
    ├── InvalidArgument            (INVALID_ARGUMENT, google.rpc.BadRequest field violations)
    │   └── UnknownPolicy          (INVALID_ARGUMENT, lists the known policies)
    ├── NotFound                   (NOT_FOUND)
    ├── FailedPrecondition         (FAILED_PRECONDITION)
    │   └── IncompatibleStream     (ingest start-up: a stream or consumer cannot serve)
    ├── Unauthenticated            (UNAUTHENTICATED)
    ├── PermissionDenied           (PERMISSION_DENIED)
    ├── Unavailable                (UNAVAILABLE; the caller may retry)
    │   ├── TransientStoreError    (a store could not commit; nothing applied)
    │   └── LLMFailure             (the model gateway gave up; Generate falls back)
    ├── Conflict                   (ABORTED: a compare-and-set lost; the engine retries)
    ├── UnreadableRecord           (DATA_LOSS: a stored record does not decode)
    │   └── UnsupportedFormat      (a stored record is newer than this build)
    ├── ProviderError              (INTERNAL if it escaped: one model attempt failed)
    └── BadEvent                   (INVALID_ARGUMENT: an event that can never be applied;
                                    ingest dead-letters it with its reason)

Domain code raises these; handlers never build statuses themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """A bad field, named by its path in the request (`candidates[3].tip_id`)."""

    field: str
    description: str


class OoError(Exception):
    """Root of every error oo-ml raises on purpose."""


class InvalidArgument(OoError):
    def __init__(self, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.violations: tuple[FieldViolation, ...] = tuple(violations)

    @classmethod
    def of(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        more = f" (+{len(violations) - 5} more)" if len(violations) > 5 else ""
        return cls(f"invalid request: {summary}{more}", violations)


class UnknownPolicy(InvalidArgument):
    def __init__(self, name: str, known: Sequence[str], field: str = "policy") -> None:
        message = f"unknown policy {name!r}; known policies: {', '.join(sorted(known))}"
        super().__init__(message, [FieldViolation(field, message)])


class NotFound(OoError):
    pass


class FailedPrecondition(OoError):
    pass


class IncompatibleStream(FailedPrecondition):
    """An existing stream or consumer cannot serve the ingest; the message says why."""


class Unauthenticated(OoError):
    pass


class PermissionDenied(OoError):
    pass


class Unavailable(OoError):
    pass


class TransientStoreError(Unavailable):
    """A store failed in a way a retry may fix (locked database, full disk)."""


class LLMFailure(Unavailable):
    """The gateway gave up; `reason` is the fallback reason ("timeout", "overloaded", ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Conflict(OoError):
    """A conditional write found the store changed; nothing in the commit was applied."""


class UnreadableRecord(OoError):
    """A stored record (state or decision) does not decode; the message says why."""


class UnsupportedFormat(UnreadableRecord):
    """A stored record's format_version is newer than this build knows."""


class ProviderError(OoError):
    """One attempt failed at the provider. `detail` is short and holds no request data."""

    def __init__(self, detail: str, *, retryable: bool, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable
        self.timed_out = timed_out


class BadEvent(OoError):
    """A message that can never be applied: its reason goes to the dead-letter copy."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

"""The one error tree of oo-ml. Each error maps to one gRPC status in `interceptors.py`.

    OoError                        (INTERNAL)
    ├── InvalidArgument            (INVALID_ARGUMENT, google.rpc.BadRequest field violations)
    │   └── UnknownPolicy          (INVALID_ARGUMENT, lists the known policies)
    ├── NotFound                   (NOT_FOUND)
    ├── FailedPrecondition         (FAILED_PRECONDITION)
    ├── Unauthenticated            (UNAUTHENTICATED)
    ├── PermissionDenied           (PERMISSION_DENIED)
    ├── Unavailable                (UNAVAILABLE; the caller may retry)
    └── TransientStoreError        (UNAVAILABLE; a store could not commit, nothing applied)

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


class Unauthenticated(OoError):
    pass


class PermissionDenied(OoError):
    pass


class Unavailable(OoError):
    pass


class TransientStoreError(Unavailable):
    """A store failed in a way a retry may fix (locked database, full disk)."""

"""The one place where errors become gRPC statuses, plus auth and deadlines.

`EdgeInterceptor` wraps every ScoringService handler:
- auth: when a token is configured, `authorization: Bearer <token>` is required
  (UNAUTHENTICATED otherwise); admin RPCs (Reset) need the admin token (PERMISSION_DENIED
  for a valid non-admin token). Health stays open so probes need no secret.
- deadlines: a call whose deadline has passed is not started, and a handler still running
  at its deadline is cancelled (DEADLINE_EXCEEDED) rather than working for nobody.
- errors: each `OoError` maps to its status; INVALID_ARGUMENT carries a
  `google.rpc.BadRequest` with one field violation per bad field. Anything else is
  INTERNAL with a generic message, and logged with its traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from oo_ml.app.metrics import Metrics
from oo_ml.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OoError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

SERVICE = "oo.scoring.v1.ScoringService"
ADMIN_METHODS = frozenset({f"/{SERVICE}/Reset"})

_CODES: list[tuple[type[OoError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def status_of(err: OoError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """The status code, message and trailing metadata (rich details) for an error."""
    code = next((c for t, c in _CODES if isinstance(err, t)), grpc.StatusCode.INTERNAL)
    message = str(err)
    if not isinstance(err, InvalidArgument) or not err.violations:
        return code, message, ()
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in err.violations
        ]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    status.details.add().Pack(bad)
    return code, message, (("grpc-status-details-bin", status.SerializeToString()),)


if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, token: str | None, admin_token: str | None, metrics: Metrics | None = None
    ) -> None:
        self.token = token
        self.admin_token = admin_token
        self.metrics = metrics or Metrics()

    def _count(self, method: str, code: str, started: float) -> None:
        labels = (("method", method.rsplit("/", 1)[-1]), ("code", code))
        self.metrics.inc("oo_rpc_total", "RPCs handled, by method and status code.", labels)
        self.metrics.observe(
            "oo_rpc_seconds",
            "RPC handling time, by method.",
            labels[:1],
            time.perf_counter() - started,
        )

    def _authorize(self, method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        if self.token is None and self.admin_token is None:
            return
        header = next((v for k, v in metadata if k == "authorization"), None)
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if not header or not header.startswith("Bearer "):
            raise Unauthenticated("missing bearer token (authorization: Bearer <token>)")
        given = header[len("Bearer ") :].encode()
        is_admin = self.admin_token is not None and hmac.compare_digest(
            given, self.admin_token.encode()
        )
        is_user = self.token is not None and hmac.compare_digest(given, self.token.encode())
        if method in ADMIN_METHODS:
            if is_admin:
                return
            if is_user:
                raise PermissionDenied(f"{method} needs the admin token")
            raise Unauthenticated("invalid bearer token")
        if not (is_user or is_admin):
            raise Unauthenticated("invalid bearer token")

    async def _fail(self, context: Context, err: BaseException) -> None:
        if isinstance(err, OoError):
            code, message, trailers = status_of(err)
            await context.abort(code, message, trailing_metadata=trailers)
        if isinstance(err, TimeoutError):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        log.error("unhandled error", exc_info=err)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    @staticmethod
    def _budget(context: Context) -> float | None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise TimeoutError
        return remaining

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(f"/{SERVICE}/"):
            return handler
        metadata = tuple(details.invocation_metadata or ())

        if handler.unary_unary is not None:
            # The grpc stubs type handlers as sync; under grpc.aio they are coroutines.
            inner: Any = handler.unary_unary

            async def unary(request: Any, context: Context) -> Any:
                async with self._guard(method, metadata, context, cancel_at_deadline=True):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                # No timeout around a stream: it would span the yields, and a cancel landing
                # in grpc's write reads as CANCELLED. grpc.aio ends a stream at its deadline.
                async with self._guard(method, metadata, context, cancel_at_deadline=False):
                    async for item in inner_stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    @asynccontextmanager
    async def _guard(
        self,
        method: str,
        metadata: tuple[tuple[str, str | bytes], ...],
        context: Context,
        *,
        cancel_at_deadline: bool,
    ) -> AsyncIterator[None]:
        """Auth, deadline, metrics and error mapping around one call."""
        started, code = time.perf_counter(), "OK"
        try:
            self._authorize(method, metadata)
            budget = self._budget(context)
            if cancel_at_deadline:
                async with asyncio.timeout(budget):
                    yield
            else:
                yield
        except Exception as e:
            code = _code_name(e)
            if _is_abort(e):
                raise
            await self._fail(context, e)
        finally:
            self._count(method, code, started)


def _code_name(e: BaseException) -> str:
    if isinstance(e, OoError):
        return status_of(e)[0].name
    if isinstance(e, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "UNKNOWN" if _is_abort(e) else "INTERNAL"


def _is_abort(e: BaseException) -> bool:
    # context.abort raises grpc.aio.AbortError; it must pass through untouched.
    return isinstance(e, grpc.aio.AbortError)

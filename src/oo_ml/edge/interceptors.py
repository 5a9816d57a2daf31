"""The one place where errors become gRPC statuses, plus auth, deadlines and metrics.

`EdgeGuard` wraps every ScoringService handler once, when the service is registered (not a
grpc ServerInterceptor, which grpc.aio would run per call), so a call pays for no handler
lookup or building:
- auth before parsing: the wrapped handler receives the raw request bytes, and
  `authorization: Bearer <token>` (scheme case-insensitive, RFC 7235) is checked before the
  body is decoded: an unauthenticated caller cannot make the server parse anything
  (UNAUTHENTICATED). `OO_AUTH_TOKEN` guards every RPC; admin RPCs (Reset) need
  `OO_ADMIN_TOKEN` when it is set (PERMISSION_DENIED for a valid non-admin token), and are
  refused to every token when auth is on without one. Health stays open for probes.
- decoding: a body that does not decode is INVALID_ARGUMENT naming the message type, never
  an internal class name.
- deadlines: a call whose deadline has passed is not started, and a handler still running
  at its deadline is cancelled (DEADLINE_EXCEEDED) rather than working for nobody.
- errors: each `OoError` maps to its status through `STATUS_OF`, keyed by class (the
  nearest listed ancestor wins); INVALID_ARGUMENT carries a `google.rpc.BadRequest` with one
  field violation per bad field. Anything else is INTERNAL with a generic message, and
  logged with its traceback.
- metrics: every call is counted by method and final status, CANCELLED included; a body
  that does not decode is also counted in `oo_bad_requests_total{reason="undecodable"}`.
- request id: each call gets one (the client's `x-request-id` when sane, else a new one),
  set in a contextvar that log lines inside the call carry, and sent back as the
  `x-request-id` initial metadata.
- logs: client errors (any status but INTERNAL) are logged at most once per method and
  status per 10 s, with the count suppressed, and never with a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2

from oo_ml.app.logs import ClientErrors, request_id, sane_request_id
from oo_ml.app.metrics import Metrics
from oo_ml.errors import (
    BadEvent,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OoError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    UnreadableRecord,
)

log = logging.getLogger(__name__)

SERVICE = "oo.scoring.v1.ScoringService"
ADMIN_METHODS = frozenset({f"/{SERVICE}/Reset"})

Code = grpc.StatusCode

# The status of each error class; an error takes the entry of its nearest listed ancestor.
STATUS_OF: dict[type[OoError], grpc.StatusCode] = {
    OoError: Code.INTERNAL,
    InvalidArgument: Code.INVALID_ARGUMENT,
    BadEvent: Code.INVALID_ARGUMENT,
    NotFound: Code.NOT_FOUND,
    FailedPrecondition: Code.FAILED_PRECONDITION,
    Unauthenticated: Code.UNAUTHENTICATED,
    PermissionDenied: Code.PERMISSION_DENIED,
    Unavailable: Code.UNAVAILABLE,
    Conflict: Code.ABORTED,
    UnreadableRecord: Code.DATA_LOSS,
}


_RESOLVED: dict[type[OoError], grpc.StatusCode] = {}


def code_of(kind: type[OoError]) -> grpc.StatusCode:
    """The status of an error class: the table entry of its nearest ancestor (memoised)."""
    code = _RESOLVED.get(kind)
    if code is None:
        code = _RESOLVED[kind] = next(STATUS_OF[c] for c in kind.__mro__ if c in STATUS_OF)
    return code


def status_of(err: OoError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """The status code, message and trailing metadata (rich details) for an error."""
    code = code_of(type(err))
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

_BEARER = "bearer "
REQUEST_ID = "x-request-id"


class Undecodable(InvalidArgument):
    """The request body is not a valid message of the method's request type."""


class EdgeGuard:
    """Wraps each ScoringService handler once, when the service is registered."""

    def __init__(
        self, token: str | None, admin_token: str | None, metrics: Metrics | None = None
    ) -> None:
        self.token = token.encode() if token is not None else None
        self.admin_token = admin_token.encode() if admin_token is not None else None
        self.metrics = metrics or Metrics()
        self.client_errors = ClientErrors(log)

    def register(
        self,
        server: grpc.aio.Server,
        add_to_server: Callable[[Any, Any], None],
        servicer: object,
    ) -> None:
        """Register `servicer` (through its generated `add_..._to_server`) on the server
        with every handler wrapped: auth before decoding, deadline, metrics, errors."""
        captured = _Capture()
        add_to_server(servicer, captured)
        if captured.service is None or captured.handlers is None:
            raise RuntimeError("the generated registration did not name its handlers")
        wrapped = {
            name: self._wrap(f"/{captured.service}/{name}", h)
            for name, h in captured.handlers.items()
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(captured.service, wrapped),)
        )
        # Registered methods skip grpc's per-call lookup of a generic handler.
        server.add_registered_method_handlers(captured.service, wrapped)

    def register_reflection(
        self, server: grpc.aio.Server, service_names: tuple[str, ...], public: bool
    ) -> None:
        """Server reflection behind the same guard as the API (`OO_REFLECTION=auth`): with
        auth on, listing or describing services needs a token. `public` opens it. Only the
        reflection handler is wrapped: Score's path is unchanged."""
        from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

        guard = EdgeGuard(None, None, self.metrics) if public else self
        guard.register(
            server,
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            reflection.aio.ReflectionServicer(service_names),
        )

    @staticmethod
    def _start(context: Context) -> None:
        """The call's request id: into the contextvar, and back to the client."""
        given = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID), None)
        rid = sane_request_id(given)
        request_id.set(rid)
        context.set_trailing_metadata(((REQUEST_ID, rid),))

    def _authorize(self, method: str, context: Context) -> None:
        """OO_AUTH_TOKEN guards every RPC; OO_ADMIN_TOKEN guards the admin RPCs (and is
        accepted wherever the user token is). With neither set, nothing is checked."""
        admin = method in ADMIN_METHODS
        if self.token is None and (self.admin_token is None or not admin):
            return
        given = self._bearer(context)
        is_admin = self.admin_token is not None and hmac.compare_digest(given, self.admin_token)
        is_user = self.token is not None and hmac.compare_digest(given, self.token)
        if admin:
            if is_admin:
                return
            if is_user:
                raise PermissionDenied(f"{method} needs the admin token")
            raise Unauthenticated("invalid bearer token")
        if not (is_user or is_admin):
            raise Unauthenticated("invalid bearer token")

    @staticmethod
    def _bearer(context: Context) -> bytes:
        header = next(
            (v for k, v in context.invocation_metadata() or () if k == "authorization"), None
        )
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if not header or header[: len(_BEARER)].lower() != _BEARER:
            raise Unauthenticated("missing bearer token (authorization: Bearer <token>)")
        return header[len(_BEARER) :].strip().encode("latin-1", "replace")

    async def _fail(self, method: str, context: Context, err: BaseException) -> None:
        """End the call with err's status (always raises); an abort passes through."""
        if _is_abort(err):
            raise err
        rid = ((REQUEST_ID, request_id.get() or ""),)
        if isinstance(err, OoError):
            code, message, trailers = status_of(err)
            if isinstance(err, Undecodable):
                self.metrics.bad_request(method.rsplit("/", 1)[-1], "undecodable")
            if code is not grpc.StatusCode.INTERNAL:
                self.client_errors(method, code.name, message)
            else:
                log.error("internal error on %s", method, exc_info=err)
            await context.abort(code, message, trailing_metadata=trailers + rid)
        if isinstance(err, TimeoutError):
            self.client_errors(method, "DEADLINE_EXCEEDED", "deadline exceeded")
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", trailing_metadata=rid
            )
        log.error("unhandled error on %s", method, exc_info=err)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error", trailing_metadata=rid)

    def _wrap(self, method: str, handler: Handler) -> Handler:
        """The handler with auth before decoding, deadline, metrics and error mapping,
        written inline (no context manager, no per-call allocation beyond the call's)."""
        decode = _decoder(handler.request_deserializer)
        record = self.metrics.rpc_recorder(method.rsplit("/", 1)[-1])
        checks_auth = self.token is not None or self.admin_token is not None
        authorize = self._authorize
        fail = self._fail
        start = self._start
        if handler.unary_unary is not None:
            # The grpc stubs type handlers as sync; under grpc.aio they are coroutines.
            inner: Any = handler.unary_unary

            async def unary(raw: bytes, context: Context) -> Any:
                started, code = time.perf_counter(), "OK"
                try:
                    start(context)
                    if checks_auth:
                        authorize(method, context)
                    budget = context.time_remaining()
                    request = decode(raw)
                    if budget is None:
                        return await inner(request, context)
                    if budget <= 0:
                        raise TimeoutError
                    # A handler still running at its deadline is cancelled, not left to
                    # work for nobody.
                    async with asyncio.timeout(budget):
                        return await inner(request, context)
                except asyncio.CancelledError:
                    code = "CANCELLED"  # the client went away (or the server is stopping)
                    raise
                except Exception as e:
                    # Recorded before the abort: grpc.aio sends the status inside abort(),
                    # so a client could scrape before `finally` ran.
                    record(_code_name(e), time.perf_counter() - started)
                    code = ""
                    await fail(method, context, e)
                finally:
                    if code:
                        record(code, time.perf_counter() - started)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=None, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(raw: bytes, context: Context) -> AsyncIterator[Any]:
                # No timeout around a stream: it would span the yields, and a cancel landing
                # in grpc's write reads as CANCELLED. grpc.aio ends a stream at its deadline.
                started, code = time.perf_counter(), "OK"
                try:
                    start(context)
                    if checks_auth:
                        authorize(method, context)
                    budget = context.time_remaining()
                    if budget is not None and budget <= 0:
                        raise TimeoutError
                    async for item in inner_stream(decode(raw), context):
                        yield item
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except Exception as e:
                    # Recorded before the abort: grpc.aio sends the status inside abort(),
                    # so a client could scrape before `finally` ran.
                    record(_code_name(e), time.perf_counter() - started)
                    code = ""
                    await fail(method, context, e)
                finally:
                    if code:
                        record(code, time.perf_counter() - started)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=None, response_serializer=handler.response_serializer
            )
        if handler.stream_stream is not None:
            # Server reflection: the token is checked before the first request is read.
            inner_bidi: Any = handler.stream_stream

            async def bidi(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                started, code = time.perf_counter(), "OK"
                try:
                    start(context)
                    if checks_auth:
                        authorize(method, context)
                    async for item in inner_bidi(requests, context):
                        yield item
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except Exception as e:
                    # Recorded before the abort: grpc.aio sends the status inside abort(),
                    # so a client could scrape before `finally` ran.
                    record(_code_name(e), time.perf_counter() - started)
                    code = ""
                    await fail(method, context, e)
                finally:
                    if code:
                        record(code, time.perf_counter() - started)

            return grpc.stream_stream_rpc_method_handler(
                bidi,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class _Capture:
    """Stands in for a server to catch what a generated `add_..._to_server` registers."""

    def __init__(self) -> None:
        self.service: str | None = None
        self.handlers: dict[str, Handler] | None = None

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come again, by name, just below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.service, self.handlers = service, handlers


def _decoder(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """bytes -> request message; a body that does not decode is INVALID_ARGUMENT."""
    if deserialize is None:
        return lambda raw: raw
    # The generated handler's deserializer is the message class's FromString.
    message = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = message.full_name if message is not None else "request message"

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except (DecodeError, RuntimeError, ValueError) as e:
            # upb raises DecodeError; some malformed inputs surface as RuntimeError.
            raise Undecodable(f"the request body is not a valid {name}: {e}") from None

    return decode


def _code_name(e: BaseException) -> str:
    if isinstance(e, OoError):
        return code_of(type(e)).name
    if isinstance(e, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "UNKNOWN" if _is_abort(e) else "INTERNAL"


def _is_abort(e: BaseException) -> bool:
    # context.abort raises grpc.aio.AbortError; it must pass through untouched.
    return isinstance(e, grpc.aio.AbortError)

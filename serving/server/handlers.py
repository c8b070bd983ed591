"""What runs around each call of the server's own services (classifier.v1 and KServe v2), wrapped once per
method at registration, in this order:

1. the call is counted (Prometheus, by method and final status code; unary calls and streams alike) and,
   with tracing on, gets its server span (the caller's traceparent continued; errors set its status);
2. the caller is checked (token, client certificate) and admitted (refused while the server drains), and
   every refusal gets an audit line;
3. only then is the request body read and parsed;
4. any error the method raises becomes its status (api/status.py): a ServingError its own code, anything
   else INTERNAL with the traceback logged, never grpc's UNKNOWN with the exception's text.

Step 3 is why a unary method is registered as a client-streaming one: grpc.aio reads, decompresses and parses
a unary request's whole message before the handler runs, so a caller with no token could make the server
hold up to --max-message-mb per call (24 such calls held a gigabyte). Registered this way the body is read
by the handler itself, after the checks; a refused call's body is never read, and gRPC core keeps at most a
flow-control window of it. The wire does not change: a unary call and a client stream with one message
look the same to the client. The body is parsed here too, so a malformed message is the caller's mistake
(INVALID_ARGUMENT), not UNKNOWN.

Wrapping at registration costs nothing on a call beyond the wrapper's own work (a server interceptor does
the same around every call at about 80 µs of CPU per request here). Health and reflection are registered
without it: probes and tooling need no token and keep answering while the server drains.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from ..engine.errors import InvalidInput, ServingError, ShuttingDown
from .access import Access, RefusalLog, Role
from .api.status import status_of
from .drain import STREAM_CUT, Admission
from .metrics import Metrics
from .tracing import Tracing, call_span

KSERVE = "/inference.GRPCInferenceService/"
# The management RPCs: they change what the server serves or how it runs (models, trace sampling, log level),
# so they need an admin token. A new management RPC is added here (a test lists every RPC of both services
# with the role it needs).
ADMIN_METHODS = frozenset({KSERVE + "RepositoryModelLoad", KSERVE + "RepositoryModelUnload", KSERVE + "TraceSetting",
                           KSERVE + "LogSettings"})
# KServe's health RPCs need no token, like grpc.health.v1 (Triton groups them as its "health" protocol):
# readiness probes written for Triton keep working.
OPEN_METHODS = frozenset({KSERVE + "ServerLive", KSERVE + "ServerReady", KSERVE + "ModelReady"})
# A stream refused or cut ends after this pause. A grpc.aio client still writing when the status arrives
# reports INTERNAL ("Internal error from Core") in place of it about one time in three (its write fails
# after the status came); the pause lets a client's window of writes land first (200 in 200 then).
STREAM_END_PAUSE_S = 0.05
# A refused stream has run nothing, so its requests are read (and dropped) until its client half-closes or
# has sent nothing for STREAM_REFUSAL_GAP_S (it waits for answers), for at most STREAM_REFUSAL_READ_S: on a
# loaded machine a client's writes can take longer than the pause above, and the status then comes once they
# have landed (with the 50 ms pause alone, refused grpc.aio streams still saw INTERNAL now and then here).
STREAM_REFUSAL_GAP_S = 0.25
STREAM_REFUSAL_READ_S = 1.0


def required_role(method: str) -> Role | None:
    """The role a method's caller needs; None for the open health RPCs."""
    if method in OPEN_METHODS:
        return None
    return Role.ADMIN if method in ADMIN_METHODS else Role.INFERENCE


def parse(deserialize: Callable[[bytes], object] | None, raw: bytes):
    """A request message from its bytes; a body that is not the method's message is the caller's mistake."""
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except (DecodeError, ValueError, TypeError, RuntimeError) as e:  # protobuf's parsers raise these
        raise InvalidInput(f"the request body is not a valid message of this method ({len(raw)} bytes; "
                           f"{type(e).__name__})") from None


class CallGate:
    """Wraps each method handler of our services (see the module's docstring)."""

    def __init__(self, access: Access, admission: Admission, metrics: Metrics, refusals: RefusalLog | None = None,
                 tracing: Tracing | None = None):
        self.access, self.admission, self.metrics = access, admission, metrics
        self.refusals = refusals or RefusalLog()
        self.tracing = tracing or Tracing()

    def _admit(self, context, needed: Role | None, name: str) -> None:
        """The caller's credential, then admission; raises the refusal (already audit-logged)."""
        try:
            self.access.check(context.invocation_metadata(), context.auth_context, needed, name)
            self.admission.enter()
        except ServingError as e:
            self.refusals.refused(name, context.peer(), str(e))
            raise

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        needed = required_role(method)
        name = method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return self._unary(handler, needed, name, method.lstrip("/"))
        if handler.stream_stream:
            return self._stream(handler, needed, name, method.lstrip("/"))
        raise TypeError(f"{method}: only unary and bidirectional streaming methods are served")

    def _unary(self, handler: grpc.RpcMethodHandler, needed: Role | None, name: str,
               span_name: str) -> grpc.RpcMethodHandler:
        inner, deserialize = handler.unary_unary, handler.request_deserializer
        admit, admission = self._admit, self.admission
        gauge, calls = self.metrics.in_flight.labels(name), self.metrics.rpcs
        tracing = self.tracing

        async def unary(requests: AsyncIterator[bytes], context):
            with _Counted(gauge, calls, name, context, tracing, span_name):
                try:
                    admit(context, needed, name)
                except ServingError as e:
                    await context.abort(*status_of(e))
                try:
                    try:
                        request = parse(deserialize, await anext(requests))
                    except StopAsyncIteration:
                        raise InvalidInput("the call carried no request message") from None
                    except ServingError as e:
                        await context.abort(*status_of(e))
                    try:
                        return await inner(request, context)
                    except grpc.aio.AbortError:
                        raise  # the servicer chose the status
                    except Exception as e:  # noqa: BLE001 - every error of every RPC becomes a mapped status
                        await context.abort(*status_of(e))
                finally:
                    admission.leave()

        return grpc.stream_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)

    def _stream(self, handler: grpc.RpcMethodHandler, needed: Role | None, name: str,
               span_name: str) -> grpc.RpcMethodHandler:
        """A stream is checked and admitted before its first message is read; admission cuts it short when the
        server drains (it ends UNAVAILABLE once the requests it read are answered)."""
        inner, deserialize = handler.stream_stream, handler.request_deserializer
        admit, admission = self._admit, self.admission
        gauge, calls = self.metrics.in_flight.labels(name), self.metrics.rpcs
        tracing = self.tracing

        async def parsed(reads) -> AsyncIterator:
            async for raw in reads:
                yield parse(deserialize, raw)

        async def stream(requests: AsyncIterator[bytes], context):
            with _Counted(gauge, calls, name, context, tracing, span_name):
                try:
                    admit(context, needed, name)
                except ShuttingDown as e:
                    admission.refusing_streams += 1
                    try:
                        await _refuse_stream(context, requests, e)
                    finally:
                        admission.refusing_streams -= 1
                except ServingError as e:  # a bad token: nothing of such a client is read
                    await _end_stream(context, e)
                try:
                    reads = admission.stream_reads(requests)
                    try:
                        async for response in inner(parsed(reads), context):
                            yield response
                    except grpc.aio.AbortError:
                        raise
                    except Exception as e:  # noqa: BLE001 - a malformed message (those before it were answered), or a bug
                        await _end_stream(context, e)
                    if reads.cut:
                        await _end_stream(context, ShuttingDown(STREAM_CUT))
                finally:
                    admission.leave()

        return grpc.stream_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)


class _Counted:
    """One call in the Prometheus counts: in flight while it runs, then by method and final status code (the
    code an abort set, or CANCELLED for a call its client left). With tracing on, the call's server span too,
    current while the call runs (for the model's attributes, the batcher and log lines) and ended with the
    same code; when tracing is off this costs one attribute read."""

    __slots__ = ("gauge", "calls", "name", "context", "tracing", "span_name", "span", "token")

    def __init__(self, gauge, calls, name: str, context, tracing: Tracing, span_name: str):
        self.gauge, self.calls, self.name, self.context = gauge, calls, name, context
        self.tracing, self.span_name, self.span = tracing, span_name, None

    def __enter__(self) -> None:
        self.gauge.inc()
        if self.tracing.on:
            self.span = self.tracing.start_call(self.span_name, self.context.invocation_metadata())
            self.token = call_span.set(self.span)

    def __exit__(self, kind, error, traceback) -> bool:
        code = "OK" if kind is None else (self.context.code().name if self.context.code() else "CANCELLED")
        self.gauge.dec()
        self.calls.labels(self.name, code).inc()
        if self.span is not None:
            with contextlib.suppress(ValueError):  # a stream may end in another context than it began
                call_span.reset(self.token)
            self.tracing.end_call(self.span, code, self.context.details() if code != "OK" else "")
        return False


async def _end_stream(context, error: Exception) -> None:
    await asyncio.sleep(STREAM_END_PAUSE_S)
    await context.abort(*status_of(error))


async def _refuse_stream(context, requests, error: ServingError) -> None:
    """End a stream refused while draining, once its client has stopped writing (see STREAM_REFUSAL_READ_S)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + STREAM_REFUSAL_READ_S
    pending = aiter(requests)
    try:
        while (left := end - loop.time()) > 0:
            async with asyncio.timeout(min(STREAM_REFUSAL_GAP_S, left)):
                await anext(pending)
    except (TimeoutError, StopAsyncIteration):
        pass
    await context.abort(*status_of(error))


class WrappingRegistrar:
    """Stands in for the server while generated `add_*Servicer_to_server` functions register a service, and
    wraps each of its method handlers once."""

    def __init__(self, server: grpc.aio.Server, wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]):
        self.server, self.wrap = server, wrap

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.server.add_registered_method_handlers(
            service, {name: self.wrap(f"/{service}/{name}", h) for name, h in handlers.items()})

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        self.server.add_generic_rpc_handlers(tuple(_WrappingGenericHandler(g, self.wrap) for g in generic_handlers))


class _WrappingGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, wrap):
        self.inner, self.wrap, self.wrapped = inner, wrap, {}

    def service(self, details):
        if details.method not in self.wrapped:
            handler = self.inner.service(details)
            if handler is None:
                return None
            self.wrapped[details.method] = self.wrap(details.method, handler)
        return self.wrapped[details.method]

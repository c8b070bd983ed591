"""What runs around each call of the server's own services (classifier.v1 and KServe v2), wrapped once per
method at registration: the token check, admission (refused while shutting down, counted in flight for the
drain) and the Prometheus counts by method and status code.

Wrapping at registration costs nothing on a call beyond the wrapper's own work: a server interceptor does
the same around every call at about 80 µs of CPU per request here, a tenth of the whole per-request cost.
Health and reflection are registered without these wrappers: probes and tooling need no token and keep
answering while the server drains (health says NOT_SERVING then).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from ..wire.inference import grpc_service_pb2 as kserve_pb
from .access import Role, TokenCheck
from .api.status import status_of
from .drain import STREAM_CUT, Admission
from .errors import ServingError, ShuttingDown
from .metrics import Metrics

KSERVE = "/inference.GRPCInferenceService/"
# The management RPCs: they change what the server serves or how it runs, so they need an admin token (trace
# and log settings answer UNIMPLEMENTED today, and are placed here for the day they do not). A new management
# RPC is added here (a test lists every RPC of both services with the role it needs).
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


# (full method name, handler) -> handler
Wrapper = Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]


def counted(metrics: Metrics) -> Wrapper:
    """Count unary calls by status code, and the calls in flight."""
    def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not handler.unary_unary:
            return handler
        inner, name = handler.unary_unary, method.rsplit("/", 1)[-1]
        gauge = metrics.in_flight.labels(name)

        async def counting(request, context):
            gauge.inc()
            code = "OK"
            try:
                return await inner(request, context)
            except BaseException:
                code = context.code().name if context.code() else "UNKNOWN"
                raise
            finally:
                gauge.dec()
                metrics.rpcs.labels(name, code).inc()

        return handler._replace(unary_unary=counting)
    return wrap


def guarded(tokens: TokenCheck, admission: Admission) -> Wrapper:
    """Check the call's token (when the server has tokens) and admit it (unless the server is shutting down).
    A stream that admission cuts short ends UNAVAILABLE once the requests it read are answered."""
    def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        needed = required_role(method) if tokens else None
        name = method.rsplit("/", 1)[-1]

        def admit(context) -> None:
            if needed is not None:
                tokens.require(context.invocation_metadata(), needed, name)
            admission.enter()

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                try:
                    admit(context)
                except ServingError as e:
                    await context.abort(*status_of(e))
                try:
                    return await inner(request, context)
                finally:
                    admission.leave()

            return handler._replace(unary_unary=unary)
        if handler.stream_stream:
            inner_stream = handler.stream_stream

            async def stream(request_iterator, context):
                try:
                    admit(context)
                except ShuttingDown as e:
                    admission.refusing_streams += 1
                    try:
                        await _refuse_stream(context, request_iterator, e)
                    finally:
                        admission.refusing_streams -= 1
                except ServingError as e:  # a bad token: nothing of such a client is read
                    await _end_stream(context, e)
                try:
                    reads = admission.stream_reads(request_iterator)
                    async for response in inner_stream(reads, context):
                        yield response
                    if reads.cut:
                        await _end_stream(context, ShuttingDown(STREAM_CUT))
                finally:
                    admission.leave()

            return handler._replace(stream_stream=stream)
        raise TypeError(f"{method}: only unary and bidirectional streaming methods are served")
    return wrap


async def _end_stream(context, error: ServingError) -> None:
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


def not_ready_while(draining: Callable[[], bool]) -> Wrapper:
    """KServe's ServerReady answers false once the drain has begun, as grpc.health.v1 answers NOT_SERVING, so
    that readiness probes of either kind fail while calls are still answered (the --drain-delay)."""
    def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method != KSERVE + "ServerReady":
            return handler
        inner = handler.unary_unary

        async def server_ready(request, context):
            if draining():
                return kserve_pb.ServerReadyResponse(ready=False)
            return await inner(request, context)

        return handler._replace(unary_unary=server_ready)
    return wrap


class WrappingRegistrar:
    """Stands in for the server while generated `add_*Servicer_to_server` functions register a service, and
    wraps each of its method handlers once, innermost wrapper first."""

    def __init__(self, server: grpc.aio.Server, wrappers: list[Wrapper]):
        self.server, self.wrappers = server, wrappers

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for wrap in self.wrappers:
            handler = wrap(method, handler)
        return handler

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.server.add_registered_method_handlers(
            service, {name: self._wrap(f"/{service}/{name}", h) for name, h in handlers.items()})

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        self.server.add_generic_rpc_handlers(tuple(_WrappingGenericHandler(g, self._wrap) for g in generic_handlers))


class _WrappingGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Wrapper):
        self.inner, self.wrap, self.wrapped = inner, wrap, {}

    def service(self, details):
        if details.method not in self.wrapped:
            handler = self.inner.service(details)
            if handler is None:
                return None
            self.wrapped[details.method] = self.wrap(details.method, handler)
        return self.wrapped[details.method]

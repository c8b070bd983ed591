"""What runs around each REST call, in the order and with the pieces of the gRPC calls' gate (handlers.py):

1. the call is counted (Prometheus `http_requests_total` by route and HTTP status, `http_requests_in_flight`)
   and, with tracing on, gets its server span (the caller's `traceparent` header continued);
2. the caller is checked (`Authorization: Bearer`, the client certificate under mutual TLS) with the role
   its KServe method needs on gRPC (`handlers.required_role`), and admitted (503 while the server drains);
   every refusal gets an audit line;
3. only then is the body read: at most --max-message-mb (413 past it, from the Content-Length before a byte
   is read), within `body_timeout_s` (408 for a body that trickles in), into one buffer of its size, and
   only while the bodies being read at once stay within BODY_BUDGET_BODIES such limits (429 past it);
4. any error becomes `{"error": "..."}` with the HTTP status of its gRPC code (`api/status.py` maps the
   server's errors to gRPC codes, `HTTP_STATUS` below maps those to HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable

import grpc
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from ...engine.errors import InvalidInput, QueueFull, ServingError
from ..access import Access, RefusalLog, Role
from ..api.status import status_of
from ..drain import Admission
from ..handlers import KSERVE, required_role
from ..tracing import Tracing, call_span

# gRPC codes as HTTP statuses, as google.rpc and grpc-gateway map them.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
JSON = "application/json"
BODY_BUDGET_BODIES = 4  # the budget of bytes being read at once, in largest bodies


class Aborted(Exception):
    """A servicer's `context.abort(code, message)`, raised so the gate answers it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class HttpCall:
    """The part of grpc.aio's ServicerContext the KServe servicer uses, for one REST call: it runs the
    servicer's own methods (their checks, their error mapping) unchanged."""

    __slots__ = ("metadata",)

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata

    def time_remaining(self) -> float | None:
        return None  # REST has no deadline of its own; the request's `timeout` parameter gives one

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        raise Aborted(code, details)


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}), content_type=JSON, headers=headers)


def _answer(error: BaseException) -> web.Response:
    if isinstance(error, BodyRefused):  # a status HTTP has and gRPC does not
        return error_response(error.http_status, str(error))
    code, message = (error.code, error.message) if isinstance(error, Aborted) else status_of(error)
    status = HTTP_STATUS.get(code, 500)
    headers = {"WWW-Authenticate": 'Bearer realm="cnn-serving"'} if status == 401 else None
    return error_response(status, message, headers)


def _identities(request: web.Request) -> dict:
    """The verified client certificate's names, as gRPC's auth context lists them (access.py reads this)."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return {}
    common = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    alt = [v for _, v in cert.get("subjectAltName", ())]
    return {"x509_common_name": common, "x509_subject_alternative_name": alt}


Handler = Callable[[web.Request, "Call"], Awaitable[web.StreamResponse]]


class Call:
    """One admitted REST call: its servicer context and its body, read on demand (after the checks)."""

    __slots__ = ("context", "_request", "_gate")

    def __init__(self, request: web.Request, gate: HttpGate, metadata):
        self._request, self._gate = request, gate
        self.context = HttpCall(metadata)

    async def body(self) -> bytes | bytearray:
        """The whole body, read into one buffer of its announced size (a chunked body: at most the limit), within
        the body timeout and the gate's budget of bytes being read at once."""
        request, gate = self._request, self._gate
        limit, n = gate.max_body_bytes, self._request.content_length
        if n is not None and n > limit:
            raise TooLarge(f"the body is {n} bytes; the limit is {limit} (--max-message-mb)")
        if n == 0 or (n is None and not request.body_exists):
            return b""
        reserved = limit if n is None else n
        if gate.reading + reserved > gate.body_budget:
            raise QueueFull(f"the server is reading {gate.reading} bytes of other bodies (its budget is "
                            f"{gate.body_budget}); retry shortly")
        gate.reading += reserved
        try:
            async with asyncio.timeout(gate.body_timeout_s):
                if n is None:
                    return await request.read()  # chunked: aiohttp stops it at client_max_size (413)
                buffer, filled = bytearray(n), 0
                while filled < n:
                    chunk = await request.content.readany()
                    if not chunk:
                        raise InvalidInput(f"the body ended after {filled} of its {n} bytes")
                    buffer[filled:filled + len(chunk)] = chunk
                    filled += len(chunk)
                return buffer
        except TimeoutError:
            raise SlowBody(f"the body did not arrive within {gate.body_timeout_s:g} s") from None
        except web.HTTPRequestEntityTooLarge:
            raise TooLarge(f"the body is over the limit of {limit} bytes (--max-message-mb)") from None
        finally:
            gate.reading -= reserved


class BodyRefused(InvalidInput):
    """A body the gate will not read, answered with its own HTTP status (on gRPC it would be INVALID_ARGUMENT)."""
    http_status = 400


class TooLarge(BodyRefused):
    http_status = 413


class SlowBody(BodyRefused):
    http_status = 408


class HttpGate:
    """Wraps each route's handler (see the module's docstring)."""

    def __init__(self, access: Access, admission: Admission, registry: CollectorRegistry, max_body_bytes: int,
                 body_timeout_s: float, tracing: Tracing | None = None, refusals: RefusalLog | None = None):
        self.access, self.admission = access, admission
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        # Bodies being read at once hold at most this many bytes (announced sizes; a chunked body counts as the
        # limit): past it a call is answered 429 at once, so many large bodies cannot add up to unbounded memory.
        self.body_budget = BODY_BUDGET_BODIES * max_body_bytes
        self.reading = 0
        self.tracing = tracing or Tracing()
        self.refusals = refusals or RefusalLog()
        self.calls = Counter("http_requests_total", "REST calls by KServe method and HTTP status",
                             ["method", "status"], registry=registry)
        self.in_flight = Gauge("http_requests_in_flight", "REST calls being served now", ["method"], registry=registry)

    def role(self, method: str) -> Role | None:
        return required_role(KSERVE + method)

    def wrap(self, method: str, handler: Handler, admitted: bool = True) -> Callable[[web.Request], Awaitable]:
        """`method`: the KServe method whose role the route needs (and its name in the counts). Calls that are
        not `admitted` (health) are neither checked nor refused while draining, like grpc.health.v1."""
        needed = self.role(method) if admitted else None
        gauge, calls, tracing = self.in_flight.labels(method), self.calls, self.tracing
        span_name = f"{KSERVE.strip('/')}/{method}"

        async def call(request: web.Request) -> web.StreamResponse:
            metadata = tuple((k.lower(), v) for k, v in request.headers.items()
                             if k.lower() in ("authorization", "traceparent", "tracestate"))
            gauge.inc()
            span = tracing.start_call(span_name, metadata) if tracing.on else None
            token = call_span.set(span) if span is not None else None
            status, entered = 500, False
            try:
                try:
                    if admitted:
                        self._admit(request, metadata, needed, method)
                        entered = True
                    response = await handler(request, Call(request, self, metadata))
                except Exception as e:  # noqa: BLE001 - every error becomes a mapped status (a bug: 500, logged)
                    response = _answer(e)
                if not self.admission.accepting:
                    response.force_close()  # draining: the client reconnects, to another replica
                status = response.status
                return response
            finally:
                if entered:
                    self.admission.leave()
                gauge.dec()
                calls.labels(method, str(status)).inc()
                if span is not None:
                    with contextlib.suppress(ValueError):
                        call_span.reset(token)
                    tracing.end_call(span, "OK" if status < 400 else str(status))

        return call

    def _admit(self, request: web.Request, metadata, needed: Role | None, method: str) -> None:
        try:
            self.access.check(metadata, lambda: _identities(request), needed, method)
            self.admission.enter()
        except ServingError as e:
            self.refusals.refused(method, request.remote or "?", str(e))
            raise


def ssl_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """The HTTPS port's TLS, from the same files as the gRPC port's: client certificates required under mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context

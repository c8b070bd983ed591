"""The REST port: aiohttp on the server's own event loop, beside gRPC, sharing its repository, batchers,
tokens, TLS files, admission (the drain) and Prometheus registry. It serves the KServe v2 REST API
(routes.py), its OpenAPI document (`/v2/openapi.json`) and the page at `/` (static/).

aiohttp parses HTTP (no parsing of our own) and bounds what a client can make it hold: header lines and
fields (8 KiB each), the body (`client_max_size`, --max-message-mb), idle keep-alive connections (closed
after IDLE_TIMEOUT_S).
"""

from __future__ import annotations

import logging
from importlib import resources

from aiohttp import http_exceptions, web, web_protocol

from ..access import Access, TlsFiles
from ..api.kserve.service import KServeService
from ..drain import Admission
from ..metrics import Metrics
from ..tracing import Tracing
from .gate import HttpGate, ssl_context
from .openapi import document
from .routes import KServeRoutes, add_routes

log = logging.getLogger("serving.server")

IDLE_TIMEOUT_S = 15.0   # an idle keep-alive connection is closed after this
SHUTDOWN_S = 1.0        # at close, calls still running get this long (the drain has waited for them already)
PAGE_FILES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
              "/style.css": ("style.css", "text/css")}
# The page loads nothing from elsewhere, runs only its own script and may call only this origin.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR with a traceback: a malformed request is the client's
    doing (answered 400), so it becomes one DEBUG line; a flood of them is no flood of tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, http_exceptions.HttpProcessingError):
            record.msg, record.args = "malformed request refused: %s", (str(error).splitlines()[0][:200],)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG)
        return True


def _page_file(name: str, content_type: str):
    body = resources.files(__package__).joinpath("static", name).read_bytes()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type,
                            headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "no-cache"})
    return serve


class _StopsReadingAtAMalformedRequest(web_protocol.RequestHandler):
    """aiohttp queues one 400 for every chunk that arrives after a request it cannot parse, and each holds its
    chunk (through the error's traceback) until answered: up to 32 chunks of 256 KB, about 8 MB, per connection
    (40 such connections sending junk made the server hold 300-470 MB). The first 400 is all the client gets,
    so reading stops there; aiohttp then answers it and closes the connection as it always does. aiohttp
    keeps its queue in a private attribute: read here and only here, and without it this does nothing."""
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        queued = getattr(self, "_messages", ())
        if queued and isinstance(queued[-1][0], getattr(web_protocol, "_ErrInfo", ())) and self.transport:
            self.transport.pause_reading()


class _Server(web.Server):
    """aiohttp's protocol factory, making the connection handler above."""
    __slots__ = ()

    def __call__(self) -> web_protocol.RequestHandler:
        handler = super().__call__()
        handler.__class__ = _StopsReadingAtAMalformedRequest  # the same slots: only data_received differs
        return handler


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


class HttpSite:
    def __init__(self, service: KServeService, access: Access, admission: Admission, metrics: Metrics,
                 max_body_bytes: int, body_timeout_s: float = 30.0, tracing: Tracing | None = None):
        server_log = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, _MalformedRequests) for f in server_log.filters):
            server_log.addFilter(_MalformedRequests())
        self.gate = HttpGate(access, admission, metrics.registry, max_body_bytes, body_timeout_s, tracing)
        self.app = web.Application(client_max_size=max_body_bytes, handler_args={"max_field_size": 8190})
        add_routes(self.app.router, KServeRoutes(service), self.gate)
        spec = document()

        async def openapi(request: web.Request) -> web.Response:
            return web.json_response(spec)
        self.app.router.add_get("/v2/openapi.json", openapi)
        for path, (name, content_type) in PAGE_FILES.items():
            self.app.router.add_get(path, _page_file(name, content_type))
        self.runner: _Runner | None = None
        self.port = 0

    async def start(self, host: str, port: int, tls: TlsFiles | None = None, reuse_port: bool = False) -> int:
        """Listen on host:port (port 0: any free one); the port bound. OSError when it cannot bind."""
        context = ssl_context(tls.cert, tls.key, tls.client_ca) if tls else None
        self.runner = _Runner(self.app, access_log=None, keepalive_timeout=IDLE_TIMEOUT_S,
                                    handle_signals=False, shutdown_timeout=SHUTDOWN_S)
        await self.runner.setup()
        host = host.strip("[]")
        # "::" means every address, IPv4 included, as it does for gRPC; asyncio would bind it IPv6-only.
        site = web.TCPSite(self.runner, None if host == "::" else host, port, ssl_context=context,
                           reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as e:
            await self.close()
            raise OSError(f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}") from None
        self.port = self.runner.addresses[0][1]
        return self.port

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

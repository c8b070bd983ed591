"""The gRPC server: classifier.v1, KServe v2 (inference.GRPCInferenceService), health and reflection on
one port, over one model repository, and KServe v2 REST on another (http/); its start (TLS, tokens, the
refusal to listen unprotected beyond loopback, the bounds on connections), its readiness, and its drain on
SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf import empty_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..engine.errors import StartRefused
from ..engine.runtime import RuntimeOptions
from ..repository_format import BUNDLED_REPOSITORY, BatchingOptions
from ..wire import _pool
from ..wire.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from .access import Access, TlsFiles, TokenCheck, check_exposure, redact_undecodable_metadata
from .api.classifier import ClassifierService
from .api.kserve import service as kserve
from .api.siblings import POLL, Siblings, SiblingServer, WorkerRole
from .connections import ConnectionLimits, ConnectionWatch, cut_connections, listen_address
from .drain import QUIET_LIMIT_S, Admission
from .handlers import CallGate, WrappingRegistrar
from .http.site import HttpSite
from .metrics import Metrics
from .repository import ModelRepository
from .tracing import TraceConfig, Tracing

log = logging.getLogger("serving.server")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The grpc.health.v1 service name that liveness probes ask; "" and each API's name answer readiness.
LIVENESS_SERVICE = "liveness"


@dataclass
class ServerOptions:
    repository: str = str(BUNDLED_REPOSITORY)
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int = 0                 # 0 = no Prometheus endpoint
    metrics_host: str = "127.0.0.1"       # the metrics port's own address: loopback unless asked
    poll_interval_s: float = 0.0          # 0 = no repository polling
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    # BatchingOptions fields given on the command line; they win over every config.pbtxt.
    batching_overrides: dict = field(default_factory=dict)
    tls: TlsFiles = field(default_factory=TlsFiles)   # server certificate; client_ca turns on mutual TLS
    inference_tokens: tuple[str, ...] = ()  # any of these, or an admin token, is needed on every call
    admin_tokens: tuple[str, ...] = ()      # these alone may call the management RPCs
    admin_identities: tuple[str, ...] = ()  # mutual TLS: client-certificate names that may call them too
    allow_unauthenticated: bool = False     # listen beyond loopback with neither tokens nor client certificates
    drain_delay_s: float = 0.0              # after SIGTERM: NOT_SERVING, yet calls still answered this long
    exit_timeout_s: float = 30.0            # then the longest wait for accepted calls to finish
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    strict_readiness: bool = True           # ready only when every model to serve has a ready version
    trace: TraceConfig = field(default_factory=TraceConfig)  # OpenTelemetry tracing (off by default)
    default_model: str = ""                 # the model of a request that names none ("": the only one served)
    http_port: int | None = None            # the KServe v2 REST port on the same host (0 = any free port; None = off)
    http_body_timeout_s: float = 30.0       # the longest a REST request's body may take to arrive
    reuse_port: bool = False                # SO_REUSEPORT on the REST port: several server processes share it
    worker: WorkerRole | None = None        # one worker of `serve --workers N` (supervisor.py); None: the whole server


class InferenceServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self.tracing = Tracing(options.trace)
        self.repository = ModelRepository(options.repository, options.runtime, options.batching,
                                          options.batching_overrides, series_factory=self.metrics.series,
                                          tracer=self.tracing)
        self.repository.default_model = options.default_model
        self.server: grpc.aio.Server | None = None
        self.port = options.port
        self.health = health.aio.HealthServicer()
        self.tokens = TokenCheck(options.inference_tokens, options.admin_tokens)
        self.access = Access(self.tokens, mutual_tls=bool(options.tls.client_ca),
                             admin_identities=options.admin_identities)
        self.admission = Admission()
        self.draining = False
        self.started = False
        self.started_at = time.time()
        self._health_names: list[str] = []
        self.connection_watch: ConnectionWatch | None = None
        self.http: HttpSite | None = None
        self.http_port = 0
        self._last_readiness: tuple[bool, str] | None = None
        # One worker of several: the port is shared, and the siblings are reached on a private socket.
        self.siblings = Siblings(options.worker) if options.worker else None
        self.sibling_server: SiblingServer | None = None

    def _grpc_options(self) -> list[tuple[str, int]]:
        o = self.options
        return [("grpc.max_receive_message_length", o.max_message_bytes),
                ("grpc.max_send_message_length", o.max_message_bytes),
                # Workers share the port (the supervisor holds it, so no other program can take it meanwhile).
                ("grpc.so_reuseport", 1 if o.worker else 0),
                *o.connections.grpc_options()]

    async def start(self) -> int:
        """Load the repository and open the port; on any failure, what was started is closed again."""
        try:
            return await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> int:
        o = self.options
        check_exposure(o.host, self.tokens, o.tls, o.allow_unauthenticated)  # before minutes of model loading
        credentials = o.tls.credentials() if o.tls else None
        o.connections.check_file_limit()
        redact_undecodable_metadata()
        if o.metrics_port:  # before minutes of model loading: a metrics port that cannot bind stops the start
            await self.metrics.serve(o.metrics_port, o.metrics_host)
        # One KServe servicer answers gRPC and, through the REST routes' transcoding, REST.
        kserve_service = kserve.KServeService(self.repository, self.readiness, self.tracing, siblings=self.siblings)
        if o.http_port is not None:  # before loading too; health answers "not ready" over REST meanwhile
            self.http = HttpSite(kserve_service, self.access, self.admission, self.metrics, o.max_message_bytes,
                                 o.http_body_timeout_s, self.tracing)
            self.http_port = await self.http.start(o.host, o.http_port, o.tls or None, o.reuse_port)
        await self.repository.load_all(unloaded=o.worker.unloaded() if o.worker else ())
        self.server = grpc.aio.server(options=self._grpc_options())
        # Our services' handlers are wrapped once: counted, caller checked and admitted, then the body read.
        ours = WrappingRegistrar(self.server, CallGate(self.access, self.admission, self.metrics,
                                                        tracing=self.tracing).wrap)
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierService(self.repository), ours)
        service_names = [classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name]
        kserve.register(ours, kserve_service)
        if o.worker:
            self.sibling_server = SiblingServer(o.worker, kserve_service.local_handlers())
            await self.sibling_server.start()
        service_names.append(kserve.SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service_names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(service_names, self.server, pool=_pool.POOL)
        address = listen_address(o.host, o.port)
        try:
            self.port = (self.server.add_secure_port(address, credentials) if credentials
                         else self.server.add_insecure_port(address))
        except RuntimeError:  # grpc raises a bare "Failed to bind" with no address in it
            self.port = 0
        if self.port == 0:
            raise StartRefused(f"cannot listen on {address}: the port is taken or the address is not this machine's")
        await self.server.start()
        self.started = True
        self.connection_watch = ConnectionWatch(o.connections.max_connections)
        self.connection_watch.start()
        if o.worker:  # an unload its siblings were told of while this worker was loading
            for name in o.worker.unloaded() - self.repository.unloaded_on_request():
                await self.repository.unload(name)
        if o.poll_interval_s > 0 and (not o.worker or o.worker.polls):  # one worker scans, then tells the others
            self.repository.start_polling(o.poll_interval_s, then=self._siblings_poll if self.siblings else None)
        self._health_names = ["", *service_names[:-1]]
        # Liveness is its own health service, SERVING while the process runs, draining included: a liveness
        # probe that asked readiness would restart a replica whose model failed to load, in a loop.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.repository.on_change = self.update_health
        await self.update_health()
        ready = [f"{mv.name}:{mv.version} ({mv.sessions.provider})" for mv in self.repository.all_ready()]
        http = f", REST on {listen_address(o.host, self.http_port)}" if self.http else ""
        log.info("%slistening on %s%s (%s); models ready: %s",
                 f"worker {o.worker.index} of {o.worker.count}: " if o.worker else "",
                 listen_address(o.host, self.port), http, self._protection(), ", ".join(ready) or "none")
        if not self.access.can_manage:
            log.info("nobody may manage: the management RPCs (model load and unload) are refused to every caller "
                     "(--admin-token-file%s allows them)", ", --admin-client-identity" if o.tls.client_ca else "")
        return self.port

    async def _siblings_poll(self) -> None:
        await self.siblings.ask(POLL, empty_pb2.Empty(), timeout=None)

    def readiness(self) -> tuple[bool, str]:
        """Whether the server is ready to take traffic, and why not. Strict (the default, as Triton's): every
        model it is meant to serve has a ready version, and there is at least one such model. Relaxed: ready
        once started. Never while draining."""
        if self.draining or not self.started:
            return False, "draining" if self.draining else "starting"
        if not self.options.strict_readiness:
            return True, ""
        return self.repository.readiness()

    async def update_health(self) -> None:
        """Bring grpc.health.v1 in line with readiness (called after every load, unload and poll): Kubernetes
        probes and Envoy's health checks ask health, tritonclient asks ServerReady, and they must agree."""
        state = self.readiness()
        status = health_pb2.HealthCheckResponse.SERVING if state[0] else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._health_names:
            await self.health.set(name, status)
        if state != self._last_readiness:
            if self._last_readiness is not None or not state[0]:
                quiet = state[0] or self.draining  # not ready because it is draining is no warning
                (log.info if quiet else log.warning)("readiness: %s", "ready" if state[0] else f"NOT ready ({state[1]})")
            self._last_readiness = state

    def _protection(self) -> str:
        o = self.options
        tls = "mutual TLS" if o.tls.client_ca else "TLS" if o.tls else "plaintext"
        return f"{tls}, {'tokens required' if self.tokens else 'no tokens'}"

    async def drain(self, delay_s: float = 0.0, timeout_s: float = 30.0) -> bool:
        """Take the server out of rotation and finish every call it accepted, as Kubernetes and Triton expect:
        health says NOT_SERVING at once; calls are still taken for `delay_s` (while load balancers learn);
        then new calls get UNAVAILABLE and open streams stop reading, and every call admitted (its requests
        queued in batchers included) is answered, for up to `timeout_s`, which also bounds the refusing that
        follows (`Admission.wait_quiet`). False when some were still running."""
        self.draining = True
        await self.update_health()  # NOT_SERVING for readiness; liveness stays SERVING
        self.repository.stop_polling()  # no version swap while draining
        if delay_s > 0:
            log.info("draining: health NOT_SERVING; still accepting calls for %gs", delay_s)
            await asyncio.sleep(delay_s)
        self.admission.close()
        deadline = time.monotonic() + timeout_s
        log.info("draining: refusing new calls; waiting up to %gs for %d call(s) in flight", timeout_s,
                 self.admission.in_flight)
        finished = await self.admission.wait_idle(timeout_s)
        if not finished:
            log.warning("exit timeout (%gs): %d call(s) still running are cut", timeout_s, self.admission.in_flight)
            return False
        await self.admission.wait_quiet(limit_s=max(0.0, min(QUIET_LIMIT_S, deadline - time.monotonic())))
        log.info("drained: every accepted call answered; %d new call(s) refused", self.admission.refused)
        return True

    async def stop(self, grace_s: float = 5.0, drain_delay_s: float = 0.0) -> bool:
        """Drain (see `drain`), close the connections and the port, then unload the models. True when no
        accepted call was cut."""
        finished = await self.drain(drain_delay_s, grace_s)
        await self.close(grace_s=1.0 if finished else 0.0)
        return finished

    async def close(self, grace_s: float = 0.0) -> None:
        """Close the client connections and the port, then unload the models. Calls still running after
        `grace_s` are cancelled; with none running (the drain is over), or no grace, the port and the
        connections are closed first (connections.py), so that what is still on its way ends UNAVAILABLE
        rather than CANCELLED."""
        self.draining = True
        self.admission.close()
        if self.connection_watch:
            self.connection_watch.stop()
        if self.server:
            if self.started and (not self.admission.in_flight or grace_s <= 0):
                await self.admission.wait_refused_streams_ended()
                cut = cut_connections(self.port)  # no await in between: no stream is refused meanwhile
                log.info("closed the port and %d client connection(s)", cut)
            await self.server.stop(grace_s)
        if self.http:
            await self.http.close()
        if self.sibling_server:
            await self.sibling_server.stop()
        if self.siblings:
            await self.siblings.close()
        await self.metrics.close()
        await self.repository.close(drain=grace_s > 0)
        await asyncio.to_thread(self.tracing.shutdown)  # the spans still buffered are exported

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()


def event_loop_factory(kind: str = "auto"):
    """The server's event loop: uvloop where installed (auto) or asked for, else asyncio's own. gRPC's
    per-call work runs on this loop; uvloop's cheaper callbacks take about 0.07 ms of CPU off each request."""
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise StartRefused("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


async def serve(options: ServerOptions, ready_message: bool = True) -> int:
    """Serve until SIGTERM or SIGINT, then drain and exit: 0 when every accepted call was answered, 1 when
    the exit timeout or a second signal cut some."""
    server = InferenceServer(options)
    port = await server.start()
    loop = asyncio.get_running_loop()
    first, second = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if first.is_set():
            second.set()
        else:
            log.info("%s: draining before exit (a second signal exits at once)", signal.Signals(signum).name)
            first.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    if ready_message:
        # A machine-readable line for scripts and tests that start the server on port 0 (signals are handled
        # from here on).
        print(f"SERVING {options.host}:{port}", flush=True)
    terminated = asyncio.create_task(server.wait())
    signalled = asyncio.create_task(first.wait())
    await asyncio.wait([terminated, signalled], return_when=asyncio.FIRST_COMPLETED)
    draining = asyncio.create_task(server.drain(options.drain_delay_s, options.exit_timeout_s))
    forced = asyncio.create_task(second.wait())
    await asyncio.wait([draining, forced], return_when=asyncio.FIRST_COMPLETED)
    if draining.done():
        finished = draining.result()
    else:
        log.warning("second signal: exiting now; %d call(s) still running are cut", server.admission.in_flight)
        draining.cancel()
        finished = not server.admission.in_flight
    forced.cancel()
    signalled.cancel()
    await server.close(grace_s=1.0 if finished else 0.0)
    log.info("stopped")
    return 0 if finished else 1

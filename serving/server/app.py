"""The gRPC server: classifier.v1, KServe v2 (inference.GRPCInferenceService), health and reflection on
one port, over one model repository; its start (TLS, tokens, the refusal to listen unprotected beyond
loopback) and its drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..repository_format import BUNDLED_REPOSITORY, BatchingOptions
from ..wire import _pool
from ..wire.classifier.v1 import classifier_pb2, classifier_pb2_grpc
from .access import TlsFiles, TokenCheck, check_exposure
from .api.classifier import ClassifierService
from .api.kserve import service as kserve
from .connections import cut_connections
from .drain import QUIET_LIMIT_S, Admission
from .handlers import WrappingRegistrar, counted, guarded, not_ready_while
from .metrics import Metrics
from .repository import ModelRepository
from .runtime import RuntimeOptions

log = logging.getLogger("serving.server")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ServerOptions:
    repository: str = str(BUNDLED_REPOSITORY)
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int = 0                 # 0 = no Prometheus endpoint
    poll_interval_s: float = 0.0          # 0 = no repository polling
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    # BatchingOptions fields given on the command line; they win over every config.pbtxt.
    batching_overrides: dict = field(default_factory=dict)
    tls: TlsFiles = field(default_factory=TlsFiles)   # server certificate; client_ca turns on mutual TLS
    inference_tokens: tuple[str, ...] = ()  # any of these, or an admin token, is needed on every call
    admin_tokens: tuple[str, ...] = ()      # these alone may call the management RPCs
    allow_unauthenticated: bool = False     # listen beyond loopback with neither tokens nor client certificates
    drain_delay_s: float = 0.0              # after SIGTERM: NOT_SERVING, yet calls still answered this long
    exit_timeout_s: float = 30.0            # then the longest wait for accepted calls to finish
    max_connection_age_s: float = 0.0       # 0 = connections live forever
    max_connection_age_grace_s: float = 0.0  # 0 = no limit on the calls of an aged connection


class InferenceServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self.repository = ModelRepository(options.repository, options.runtime, options.batching,
                                          options.batching_overrides, observer_factory=self.metrics.observer)
        self.server: grpc.aio.Server | None = None
        self.port = options.port
        self.health = health.aio.HealthServicer()
        self.tokens = TokenCheck(options.inference_tokens, options.admin_tokens)
        self.admission = Admission()
        self.draining = False
        self.started_at = time.time()

    def _grpc_options(self) -> list[tuple[str, int]]:
        o = self.options
        options = [("grpc.max_receive_message_length", o.max_message_bytes),
                   ("grpc.max_send_message_length", o.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        if o.max_connection_age_s > 0:  # clients behind an L4 balancer reconnect, and spread over new replicas
            options.append(("grpc.max_connection_age_ms", int(o.max_connection_age_s * 1000)))
        if o.max_connection_age_grace_s > 0:
            options.append(("grpc.max_connection_age_grace_ms", int(o.max_connection_age_grace_s * 1000)))
        return options

    async def start(self) -> int:
        o = self.options
        check_exposure(o.host, self.tokens, o.tls, o.allow_unauthenticated)  # before minutes of model loading
        credentials = o.tls.credentials() if o.tls else None
        await self.repository.load_all()
        self.server = grpc.aio.server(options=self._grpc_options())
        # Our services' handlers are wrapped once: token check and admission, then the Prometheus counts.
        ours = WrappingRegistrar(self.server, [not_ready_while(lambda: self.draining),
                                               guarded(self.tokens, self.admission), counted(self.metrics)])
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierService(self.repository), ours)
        service_names = [classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name]
        kserve.register(ours, self.repository)
        service_names.append(kserve.SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service_names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(service_names, self.server, pool=_pool.POOL)
        address = f"{o.host}:{o.port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {o.host}:{o.port}")
        await self.server.start()
        if o.poll_interval_s > 0:
            self.repository.start_polling(o.poll_interval_s)
        if o.metrics_port:
            self.metrics.serve(o.metrics_port, o.host)
        for name in service_names[:-1]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        ready = [f"{mv.name}:{mv.version} ({mv.sessions.provider})" for mv in self.repository.all_ready()]
        log.info("listening on %s:%d (%s); models ready: %s", o.host, self.port, self._protection(), ", ".join(ready) or "none")
        if self.tokens and not self.tokens.has_admin:
            log.info("no admin token: the management RPCs (model load and unload) are refused to every caller")
        return self.port

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
        await self.health.enter_graceful_shutdown()
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
        if self.server:
            if not self.admission.in_flight or grace_s <= 0:
                await self.admission.wait_refused_streams_ended()
                cut = cut_connections(self.port)  # no await in between: no stream is refused meanwhile
                log.info("closed the port and %d client connection(s)", cut)
            await self.server.stop(grace_s)
        await self.repository.close(drain=grace_s > 0)

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
            raise RuntimeError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
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

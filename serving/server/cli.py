"""`python -m serving serve`: the server's command line. Its imports are light (argparse), so the command
is listed by any install; running it needs the `[server]` extra, and says so when it is missing."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from ..cli_support import DefaultsHelpFormatter, comma_list, flags
from ..engine.errors import StartRefused


def worker_count(text: str) -> int | str:
    """`--workers`: a number of server processes (at least 1), or `auto`."""
    text = str(text).strip().lower()
    if text == "auto":
        return text
    count = int(text)
    if count < 1:
        raise ValueError(f"{count} workers")
    return count

SERVER_EXTRA_HINT = "the server is not installed: pip install 'cnn-serving[server]'"


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", default="", help="repository directory "
                   "(default: the bundled one, in a checkout)")
    p.add_argument("--default-model", default="", help="the model a request that names none gets (default: "
                   "the only one in the repository; with several, such a request is refused)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all: needs tokens, "
                   "client certificates or --allow-unauthenticated)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=8000, help="KServe v2 REST port on the same host, with the page "
                   "at / (HTTPS with the gRPC port's TLS files; 0 = off)")
    p.add_argument("--workers", type=worker_count, default="auto", help="server processes sharing the port, each a "
                   "whole server with its own sessions, supervised by this one: N, or auto (one per usable core, at "
                   "most 8, on a GPU host too); 1 = this process is the server (see docs/serving.md, Workers)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus HTTP port, serving /metrics (0 = off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics port (default loopback: "
                   "0.0.0.0 or :: lets a scraper on another host in)")
    p.add_argument("--strict-readiness", action=argparse.BooleanOptionalAction, default=True,
                   help="ready (health SERVING, ServerReady true) only when every model in the repository, less "
                   "those unloaded on request, has a ready version, and there is at least one (default); "
                   "--no-strict-readiness: ready once started, whatever the models")
    p.add_argument("--poll-interval", type=float, default=0.0, help="seconds between repository scans "
                   "that load new versions without restart (0 = off)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="execution provider: auto "
                   "picks CUDA where usable, else the CPU; cuda refuses to start without a usable GPU")
    p.add_argument("--tensorrt", action="store_true", help="try the TensorRT provider first")
    p.add_argument("--trt-cache-dir", default="", help="TensorRT engine cache directory")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA provider: capture one CUDA graph per batch-size "
                   "bucket (powers of two) and replay it, padding each batch up to its bucket")
    p.add_argument("--intra-op-threads", type=int, default=0, help="threads per session (0 = cores / instances)")
    p.add_argument("--ort-spin", action="store_true", help="let idle onnxruntime threads spin-wait")
    p.add_argument("--max-batch-size", type=int, help="override every model's max_batch_size")
    p.add_argument("--max-queue-delay-us", type=int, help="override every model's max_queue_delay_microseconds")
    p.add_argument("--instances", type=int, help="override every model's instance count")
    p.add_argument("--max-queue-size", type=int, help="override every model's queue bound")
    p.add_argument("--inline-budget-us", type=int, help="run batches predicted to take less than this on the "
                   "event loop itself, skipping the thread hop (CPU only; 0 = never; default 1000)")
    p.add_argument("--max-message-mb", type=int, default=64, help="largest gRPC message or REST body accepted")
    p.add_argument("--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="uvloop where installed (auto): about 0.07 ms less CPU per request than asyncio's loop")
    obs = p.add_argument_group("observability (see docs/observability.md)")
    obs.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="the least severe lines logged: DEBUG adds per-session and per-scan detail, WARNING keeps "
                     "only what needs attention (default %(default)s; LogSettings changes it at run time)")
    obs.add_argument("--log-format", default="text", choices=["text", "json"], help="text lines, or one JSON object "
                     "per line (time, level, logger, message; trace_id and span_id on lines about a traced call)")
    obs.add_argument("--trace", action="store_true", help="export OpenTelemetry spans of every call, its queue wait "
                     "and its batch over OTLP/gRPC (needs the [trace] extra; the endpoint, service name and sampler "
                     "come from OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER/_ARG)")
    obs.add_argument("--trace-config", action="append", default=[], metavar="KEY=VALUE",
                     help="Triton-like tracing settings, repeatable: level=OFF|TIMESTAMPS (TIMESTAMPS turns tracing "
                     "on, as --trace), rate=N (one request in N), mode=opentelemetry, opentelemetry,url=HOST:PORT")
    access = p.add_argument_group("access (see docs/security.md)")
    access.add_argument("--tls-cert", default="", help="server certificate chain (PEM): turns on TLS")
    access.add_argument("--tls-key", default="", help="the certificate's private key (PEM)")
    access.add_argument("--tls-client-ca", default="", help="CA (PEM) that must have signed every client's "
                        "certificate: turns on mutual TLS")
    access.add_argument("--auth-token-file", default="", help="tokens (one per line) of which a call must carry "
                        "one as `authorization: Bearer <token>`; also read from $CNN_SERVING_AUTH_TOKENS")
    access.add_argument("--admin-token-file", default="", help="tokens that alone may load and unload models "
                        "(and may call everything else); also read from $CNN_SERVING_ADMIN_TOKENS")
    access.add_argument("--admin-client-identity", default="", help="mutual TLS: comma-separated client-certificate "
                        "names (common name or subject alternative name) that may load and unload models; without "
                        "it or an admin token, management is refused to every caller")
    access.add_argument("--allow-unauthenticated", action="store_true", help="listen on a non-loopback --host "
                        "with neither tokens nor client certificates")
    life = p.add_argument_group("shutdown and connections (see docs/reliability.md, docs/security.md)")
    life.add_argument("--drain-delay", type=float, default=0.0, help="seconds after SIGTERM during which health "
                      "says NOT_SERVING but calls are still accepted (endpoint propagation)")
    life.add_argument("--exit-timeout", type=float, default=30.0, help="then the longest wait, in seconds, for "
                      "accepted calls to be answered before the models are unloaded")
    life.add_argument("--grpc-max-connection-age", type=float, default=1800.0, help="seconds after which a client "
                      "connection is asked to reconnect, so clients spread over new replicas (0 = never; default "
                      "%(default)s)")
    life.add_argument("--grpc-max-connection-age-grace", type=float, default=0.0, help="seconds an aged "
                      "connection's calls may still take before it is closed (0 = no limit)")
    life.add_argument("--grpc-max-connection-idle", type=float, default=300.0, help="seconds after which a "
                      "connection with no call is closed (0 = never; default %(default)s)")
    life.add_argument("--grpc-max-concurrent-streams", type=int, default=1024, help="calls open at once on one "
                      "connection (default %(default)s)")
    life.add_argument("--grpc-handshake-timeout", type=float, default=10.0, help="seconds a new connection has to "
                      "finish TLS and the HTTP/2 preface (default %(default)s)")
    life.add_argument("--max-connections", type=int, default=4096, help="client connections open at once; more "
                      "are refused, with a log line (0 = no cap; default %(default)s)")


def server_options(args: argparse.Namespace):
    from ..engine.runtime import RuntimeOptions
    from ..repository_format import BUNDLED_REPOSITORY
    from .access import ADMIN_TOKENS_ENV, INFERENCE_TOKENS_ENV, TlsFiles, read_tokens
    from .app import ServerOptions
    from .connections import ConnectionLimits
    from .tracing import TraceConfig
    overrides = {k: v for k, v in {"max_batch_size": args.max_batch_size, "max_queue_delay_us": args.max_queue_delay_us,
                                   "instances": args.instances, "max_queue_size": args.max_queue_size,
                                   "inline_budget_us": args.inline_budget_us}.items()
                 if v is not None}
    return ServerOptions(
        repository=args.model_repository or str(BUNDLED_REPOSITORY), default_model=args.default_model, host=args.host,
        port=args.port, http_port=args.http_port or None,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, strict_readiness=args.strict_readiness,
        poll_interval_s=args.poll_interval, max_message_bytes=args.max_message_mb * 1024 * 1024,
        runtime=RuntimeOptions(device=args.device, tensorrt=args.tensorrt, trt_cache_dir=args.trt_cache_dir,
                               intra_op_threads=args.intra_op_threads, spin_wait=args.ort_spin,
                               cuda_graphs=args.cuda_graphs),
        batching_overrides=overrides,
        trace=TraceConfig.parse(args.trace_config, enabled=args.trace),
        tls=TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca),
        inference_tokens=read_tokens(args.auth_token_file, INFERENCE_TOKENS_ENV),
        admin_tokens=read_tokens(args.admin_token_file, ADMIN_TOKENS_ENV),
        admin_identities=tuple(comma_list(args.admin_client_identity)),
        allow_unauthenticated=args.allow_unauthenticated,
        drain_delay_s=args.drain_delay, exit_timeout_s=args.exit_timeout,
        connections=ConnectionLimits(
            max_connections=args.max_connections, max_concurrent_streams=args.grpc_max_concurrent_streams,
            idle_s=args.grpc_max_connection_idle, age_s=args.grpc_max_connection_age,
            age_grace_s=args.grpc_max_connection_age_grace, handshake_timeout_s=args.grpc_handshake_timeout))


def cmd_serve(args: argparse.Namespace) -> int:
    if args.environment_errors:  # a CNN_SERVING_* variable that does not parse: refused as a bad flag would be
        args.serve_parser.error("; ".join(args.environment_errors))
    from .logs import CONTROL
    CONTROL.configure(args.log_level, args.log_format)
    try:
        from .app import event_loop_factory, serve
    except ImportError as e:  # onnxruntime, Pillow, health or reflection missing: the base install
        print(f"error: {SERVER_EXTRA_HINT} ({e})", file=sys.stderr)
        return 2
    from .supervisor import resolve_workers, supervise
    try:
        workers = resolve_workers(args.workers)
        if workers > 1:  # N processes on the port, this one supervising them (supervisor.py)
            with asyncio.Runner() as runner:
                return runner.run(supervise(server_options(args), workers, args.log_level, args.log_format,
                                            args.event_loop))
        with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
            return runner.run(serve(server_options(args)))
    except StartRefused as e:  # a missing repository, a port in use, an unprotected start, a bad --trace-config,
        # tracing without its extra: one line, no traceback (anything else is a bug and shows its traceback)
        print(f"error: {e}", file=sys.stderr)
        return 2


ENV_PREFIX = "CNN_SERVING_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def environment_variable(action: argparse.Action) -> str:
    """The variable that sets a flag: --exit-timeout is CNN_SERVING_EXIT_TIMEOUT."""
    return ENV_PREFIX + action.dest.upper()


def serve_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return flags(parser)


def apply_environment(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    """Every serve flag may come from its CNN_SERVING_* variable (containers and Kubernetes set those);
    a flag on the command line still wins. A value that does not parse is refused with the variable named, when
    `serve` runs: the variables are the server's, and a client command run in the same environment ignores them."""
    errors: list[str] = []
    parser.set_defaults(environment_errors=errors, serve_parser=parser)
    for action in serve_flags(parser):
        name = environment_variable(action)
        if name not in environ:
            continue
        raw = environ[name].strip()
        if isinstance(action, argparse._AppendAction):  # a repeatable flag: its values apart by spaces
            value = raw.split()
        elif isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if raw.lower() not in _TRUE | _FALSE:
                errors.append(f"{name}={raw!r}: use 1/true/yes or 0/false/no")
                continue
            value = raw.lower() in _TRUE
        else:
            try:
                value = action.type(raw) if action.type else raw
            except ValueError:
                errors.append(f"{name}={raw!r} is not a valid {action.type.__name__}")
                continue
            if action.choices and value not in action.choices:
                errors.append(f"{name}={raw!r}: choose one of {', '.join(map(str, action.choices))}")
                continue
        parser.set_defaults(**{action.dest: value})


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model repository over gRPC (needs the [server] extra)",
                              formatter_class=DefaultsHelpFormatter,
                              epilog=f"Every flag can be set by its {ENV_PREFIX}* variable: --exit-timeout by "
                              f"{ENV_PREFIX}EXIT_TIMEOUT, --allow-unauthenticated by {ENV_PREFIX}ALLOW_UNAUTHENTICATED=1.")
    serve_arguments(p)
    apply_environment(p, dict(os.environ))
    p.set_defaults(func=cmd_serve)

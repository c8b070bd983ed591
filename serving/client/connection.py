"""How a client reaches a server: plaintext or TLS (with a client certificate for mutual TLS), and the bearer
token sent with every call. Shared by both clients, the CLI, the `repository` command and batch jobs."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_ENV = "CNN_SERVING_TOKEN"

Metadata = tuple[tuple[str, str], ...]


class SetupError(Exception):
    """A connection setting that cannot work (a missing file, half a client certificate); says what to fix."""


@dataclass(frozen=True)
class Tls:
    """TLS for a client channel, as PEM bytes. `ca` is the CA that signed the server's certificate (None: the
    system's roots); `cert` and `key` are the client's own certificate and key, for a server that asks for
    one (mutual TLS)."""
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_files(cls, ca: str | os.PathLike | None = None, cert: str | os.PathLike | None = None,
                   key: str | os.PathLike | None = None) -> Tls:
        if bool(cert) != bool(key):
            raise SetupError("a client certificate needs both --tls-cert and --tls-key")
        return cls(*(_read(p, flag) if p else None for p, flag in ((ca, "--tls-ca"), (cert, "--tls-cert"),
                                                                     (key, "--tls-key"))))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def _read(path: str | os.PathLike, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SetupError(f"{flag} {path}: {e.strerror or e}") from None


def channel(target: str, options: list, tls: Tls | None) -> grpc.Channel:
    return grpc.secure_channel(target, tls.credentials(), options) if tls else grpc.insecure_channel(target, options)


def aio_channel(target: str, options: list, tls: Tls | None) -> grpc.aio.Channel:
    return (grpc.aio.secure_channel(target, tls.credentials(), options) if tls
            else grpc.aio.insecure_channel(target, options))


def read_token_file(path: str | os.PathLike) -> str:
    """The first token in a file (blank lines and # comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SetupError(f"--token-file {path}: {e.strerror or e}") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise SetupError(f"--token-file {path} holds no token")


def call_metadata(token: str | None) -> Metadata | None:
    """The metadata that carries `token` on every call. None takes the token from $CNN_SERVING_TOKEN; "" sends
    none. (Plain metadata rather than gRPC call credentials, which refuse plaintext channels: a token may travel
    over a loopback or a service mesh's own TLS.)"""
    if token is None:
        token = os.environ.get(TOKEN_ENV, "").strip()
    return (("authorization", f"Bearer {token}"),) if token else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The connection flags of every client command."""
    g = p.add_argument_group("connection (see docs/security.md)")
    g.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root certificates "
                   "(implied by --tls-ca, --tls-cert and --tls-key)")
    g.add_argument("--tls-ca", default="", help="CA certificate (PEM) that signed the server's certificate")
    g.add_argument("--tls-cert", default="", help="this client's certificate (PEM), for a server that asks for one")
    g.add_argument("--tls-key", default="", help="this client's private key (PEM)")
    g.add_argument("--token-file", default="", help=f"file whose first line is the token to send (default: ${TOKEN_ENV})")


def from_arguments(args: argparse.Namespace) -> tuple[Tls | None, str | None]:
    """(tls, token) from the flags of `add_arguments`; token None means $CNN_SERVING_TOKEN."""
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = Tls.from_files(args.tls_ca or None, args.tls_cert or None, args.tls_key or None)
    token = read_token_file(args.token_file) if args.token_file else None
    return tls, token

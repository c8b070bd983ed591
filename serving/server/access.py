"""Who may reach the server and what they may call: TLS (and client certificates), bearer tokens in two
roles, client-certificate identities allowed to manage, the refusal to listen beyond loopback with no
authentication at all, and the audit line of every refused call.

Tokens are read once at start. A call presents one as `authorization: Bearer <token>` metadata; it is
compared with every known token in constant time (HMAC comparison of SHA-256 digests, never stopping at
the first match), so the time taken says nothing about how much of a token was right.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..engine.errors import PermissionDenied, StartRefused, Unauthenticated

audit_log = logging.getLogger("serving.audit")

INFERENCE_TOKENS_ENV = "CNN_SERVING_AUTH_TOKENS"
ADMIN_TOKENS_ENV = "CNN_SERVING_ADMIN_TOKENS"
MIN_TOKEN_CHARS = 16
TOKEN_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class Role(enum.IntEnum):
    """What a token allows; a higher role allows everything a lower one does."""
    INFERENCE = 1  # inference and metadata RPCs of both APIs
    ADMIN = 2      # also the management RPCs (load, unload)


def parse_tokens(text: str, where: str, separators: str = "\n") -> list[str]:
    """Tokens from a file's text (one per line) or a variable (separated by commas or whitespace). Blank
    lines and lines starting with # are skipped. Each token must be printable ASCII without spaces (it travels
    in a gRPC metadata value) and at least MIN_TOKEN_CHARS long."""
    if separators != "\n":
        for sep in separators:
            text = text.replace(sep, "\n")
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
            raise StartRefused(f"{where}, token {number}: use printable ASCII without spaces ({TOKEN_HINT})")
        if len(token) < MIN_TOKEN_CHARS:
            raise StartRefused(f"{where}, token {number}: {len(token)} characters is guessable; use at least "
                               f"{MIN_TOKEN_CHARS} ({TOKEN_HINT})")
        tokens.append(token)
    return tokens


def read_tokens(path: str | os.PathLike | None, env_var: str) -> tuple[str, ...]:
    """The tokens of a file (one per line) and of an environment variable (comma- or space-separated), both
    counted. A file that is given but holds no token is an error: it would silently turn tokens off."""
    tokens: list[str] = []
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise StartRefused(f"cannot read the token file {path}: {e.strerror or e}") from None
        tokens += parse_tokens(text, str(path))
        if not tokens:
            raise StartRefused(f"the token file {path} holds no token (one per line; {TOKEN_HINT})")
    tokens += parse_tokens(os.environ.get(env_var, ""), f"${env_var}", separators=", \t")
    return tuple(dict.fromkeys(tokens))


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class TokenCheck:
    """The tokens a server knows and the role each one has."""

    def __init__(self, inference_tokens: Iterable[str] = (), admin_tokens: Iterable[str] = ()):
        admin = list(dict.fromkeys(admin_tokens))
        inference = [t for t in dict.fromkeys(inference_tokens) if t not in admin]  # listed twice: the higher role
        self._known = [(_digest(t), Role.INFERENCE) for t in inference] + [(_digest(t), Role.ADMIN) for t in admin]
        self.has_admin = bool(admin)

    def __bool__(self) -> bool:
        return bool(self._known)

    def role_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Role:
        """The role of the call's token; Unauthenticated when it has none or an unknown one."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if value is None:
            raise Unauthenticated("this server requires a token: send the call metadata "
                                  "`authorization: Bearer <token>` (project clients: --token-file or $CNN_SERVING_TOKEN)")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must read `Bearer <token>`")
        presented = _digest(token.strip())
        role = 0
        for digest, known_role in self._known:  # every entry, whatever matched: constant in the token's content
            if hmac.compare_digest(presented, digest):
                role = max(role, known_role)
        if not role:
            raise Unauthenticated("the token is not valid for this server")
        return Role(role)



def certificate_identities(auth_context: dict) -> set[str]:
    """The names a verified client certificate carries: its common name and every subject alternative name
    (DNS, e-mail, URI, IP), as gRPC's auth context lists them."""
    names = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, ()):
            names.add(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
    return names


class Access:
    """Who may call what, from the call's token and (under mutual TLS) its client certificate.

    - No tokens and no client certificates (loopback, or --allow-unauthenticated): every call is allowed.
    - Tokens: every call needs one; an admin token allows the management RPCs.
    - Mutual TLS: the handshake has verified the certificate, which allows inference and metadata calls.
      Management needs an admin token or a certificate whose common name or a subject alternative name is in
      `admin_identities` (--admin-client-identity); with neither configured, management is refused to all.
    """

    def __init__(self, tokens: TokenCheck, mutual_tls: bool = False, admin_identities: Iterable[str] = ()):
        self.tokens = tokens
        self.mutual_tls = mutual_tls
        self.admin_identities = frozenset(admin_identities)
        self.open = not tokens and not mutual_tls  # nobody is asked who they are

    @property
    def can_manage(self) -> bool:
        """Whether anyone at all may call the management RPCs."""
        return self.open or self.tokens.has_admin or bool(self.mutual_tls and self.admin_identities)

    def check(self, metadata, auth_context, needed: Role | None, method: str) -> None:
        """Raise Unauthenticated or PermissionDenied unless the call may run a method needing `needed`.
        `auth_context` is a callable, asked only for a management call (it copies the peer's certificate)."""
        if needed is None or self.open:
            return
        role = self.tokens.role_of(metadata) if self.tokens else Role.INFERENCE
        if role >= needed:
            return
        if self.mutual_tls and self.admin_identities and certificate_identities(auth_context()) & self.admin_identities:
            return
        if not self.can_manage:
            raise PermissionDenied(f"{method} is a management call and this server allows nobody to manage it: "
                                   "start it with --admin-token-file, or (mutual TLS) --admin-client-identity")
        ways = ["an admin token (the server's --admin-token-file)"] if self.tokens.has_admin else []
        if self.mutual_tls and self.admin_identities:
            ways.append("a client certificate named in the server's --admin-client-identity")
        raise PermissionDenied(f"{method} is a management call: it needs {' or '.join(ways)}; this caller may "
                               "make inference and metadata calls only")


class _UndecodableMetadata(logging.Filter):
    """grpcio logs a metadata value that is not UTF-8 at ERROR, with the raw bytes and a traceback: for an
    `authorization` value, the token itself. Such a record is cut to one line without the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Invalid encoding on"):
            size = len(record.args[0]) if record.args and isinstance(record.args[0], bytes | str) else "?"
            record.msg, record.args = "a call's metadata value is not UTF-8 (%s bytes, not logged)", (size,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def redact_undecodable_metadata() -> None:
    """Install the filter above on grpcio's logger (once)."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _UndecodableMetadata) for f in grpc_log.filters):
        grpc_log.addFilter(_UndecodableMetadata())


class RefusalLog:
    """One audit line per refused call (method, peer, reason), at most `per_second` lines a second: a flood of
    refused calls must not become a flood of log lines. The next line logged says how many were left out."""

    def __init__(self, per_second: float = 10.0):
        self.interval = 1.0 / per_second
        self.next_at = 0.0
        self.left_out = 0

    def refused(self, method: str, peer: str, reason: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.left_out += 1
            return
        self.next_at = now + self.interval
        more = f" (+{self.left_out} refused call(s) not logged)" if self.left_out else ""
        self.left_out = 0
        audit_log.warning("refused %s from %s: %s%s", method, peer, reason, more)


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key (PEM), and the CA its clients' certificates must be signed by."""
    cert: str = ""
    key: str = ""
    client_ca: str = ""

    def __bool__(self) -> bool:
        return bool(self.cert or self.key or self.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise StartRefused("TLS needs both --tls-cert and --tls-key"
                               + (" (--tls-client-ca turns on client certificates over TLS)" if self.client_ca else ""))
        cert, key = _read_pem(self.cert, "--tls-cert"), _read_pem(self.key, "--tls-key")
        client_ca = _read_pem(self.client_ca, "--tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)


def _read_pem(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise StartRefused(f"{flag} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise StartRefused(f"{flag} {path} is not a PEM file (it has no -----BEGIN line)")
    return data


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; False for 0.0.0.0, ::, "" and any other name or address."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, tokens: TokenCheck, tls: TlsFiles, allow_unauthenticated: bool) -> None:
    """Refuse to listen beyond loopback when nobody would be asked who they are (secure by default)."""
    if is_loopback(host) or tokens or tls.client_ca or allow_unauthenticated:
        return
    raise StartRefused(f"refusing to listen on {host or 'all addresses'} without authentication: give "
                       f"--auth-token-file (or ${INFERENCE_TOKENS_ENV}) or --tls-client-ca, or --allow-unauthenticated "
                       "to let anyone who reaches the port call it")

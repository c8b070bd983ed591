"""A throwaway certificate authority for the tests, made at run time (no key is committed): a CA, a server
certificate for 127.0.0.1 and localhost, two client certificates signed by the CA, and one signed by a stranger."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path   # a client certificate signed by another CA
    stranger_key: Path
    operator_cert: Path   # a client certificate of the CA named "operator", alias ops.example.test
    operator_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False,
                 alias: str = ""):
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if alias:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(alias)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client", "other_ca", "stranger",
                                                                   "operator")}
    ca = _certificate("test CA", keys["ca"], "test CA", keys["ca"], ca=True)
    other_ca = _certificate("another CA", keys["other_ca"], "another CA", keys["other_ca"], ca=True)
    ca_path, _ = _write(directory, "ca", ca, keys["ca"])
    server = _write(directory, "server", _certificate("127.0.0.1", keys["server"], "test CA", keys["ca"], server=True),
                    keys["server"])
    client = _write(directory, "client", _certificate("client", keys["client"], "test CA", keys["ca"]), keys["client"])
    stranger = _write(directory, "stranger",
                      _certificate("stranger", keys["stranger"], "another CA", keys["other_ca"]), keys["stranger"])
    operator = _write(directory, "operator", _certificate("operator", keys["operator"], "test CA", keys["ca"],
                                                          alias="ops.example.test"), keys["operator"])
    _write(directory, "other_ca", other_ca, keys["other_ca"])
    return Pki(ca_path, *server, *client, *stranger, *operator)

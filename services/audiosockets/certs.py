"""A site's certificates: one CA, and server/client certificates it signs.

``audiosockets certs init DIR`` writes ``DIR/ca.pem`` and ``DIR/ca.key``;
``audiosockets certs issue DIR NAME`` writes ``DIR/NAME.pem`` and ``DIR/NAME.key``
signed by that CA. Every key is written with mode 0600 and never overwritten:
issuing again means removing the old files first, on purpose.

Keys are ECDSA P-256 (small, fast, accepted by every TLS 1.2+ stack). An issued
certificate is good for both ends of a connection (extended key usage
serverAuth and clientAuth), so one ``issue`` serves a relay or a client; its
subject alternative names are the ``--dns``/``--ip`` given, plus NAME as a DNS
name when no ``--dns`` is given. Built on ``cryptography`` (the ``certs`` extra).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Lifetimes in days: the CA outlives the certificates it signs.
CA_DAYS = 3650
CERT_DAYS = 825  # the longest lifetime browsers still accept for server certificates
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Issued:
    """Paths of a certificate and its private key (PEM)."""

    cert: Path
    key: Path


def _crypto() -> Any:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError(
            "audiosockets certs needs the cryptography library: pip install 'audiosockets[certs]'"
        ) from None
    from cryptography import x509

    return x509


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; an existing file is a ConfigError, never replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; remove it to write a new one") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_site(directory: Path, *, common_name: str = "audiosockets site CA") -> Issued:
    """Create ``directory`` (mode 0700 when new) holding a new CA certificate and key.

    Raises ConfigError when the directory already holds a CA (``ca.pem`` or
    ``ca.key``) or cannot be written.
    """
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if path.exists():
            raise ConfigError(f"{directory} already holds a CA ({path.name}); use another DIR")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {directory}: {exc.strerror or exc}") from exc
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_new(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(cert_path, key_path)


def issue(
    directory: Path,
    name: str,
    *,
    ips: Iterable[str] = (),
    dns: Iterable[str] = (),
) -> Issued:
    """Issue ``DIR/NAME.pem`` and ``DIR/NAME.key`` signed by the CA in ``directory``.

    ``name`` is the certificate's common name and its file name (letters,
    digits, ``.``, ``_``, ``-``; at most 64). ``ips``: IPv4/IPv6 addresses and
    ``dns``: host names for the subject alternative names (a client checks the
    relay's host against them); with no ``dns``, ``name`` is one. Raises
    ConfigError for a bad name or address, a missing or unreadable CA, or
    files that already exist.
    """
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not _NAME.fullmatch(name) or name in ("ca",):
        raise ConfigError(
            f"certificate name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(not 'ca'), starting with a letter or digit"
        )
    addresses = []
    for text in ips:
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise ConfigError(f"--ip {text!r} is not an IPv4 or IPv6 address") from None
    hosts = list(dns) or [name]
    for host in hosts:
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise ConfigError(f"--dns {host!r} is not a host name")
    ca_cert, ca_key = _load_ca(directory)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; remove it to issue {name!r} again")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    alt_names = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(a) for a in addresses]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=CERT_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_new(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(cert_path, key_path)


def _load_ca(directory: Path) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"no site CA in {directory} ({exc.strerror or exc}: {exc.filename}); "
            f"run `audiosockets certs init {directory}` first"
        ) from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the site CA in {directory} cannot be loaded: {exc}") from exc
    return cert, key

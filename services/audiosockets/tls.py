"""TLS on the protocol port, with the standard library's ``ssl``.

Contexts are built once, from files, before anything connects: a file that
cannot be read, is not PEM, or a key that does not match its certificate is a
``ConfigError`` (one line, exit 2) at start-up, never a failure per session.

* Clients (``client_context``): TLS 1.2 minimum; the relay's certificate is
  verified against ``ca`` (or the system's trust store) and its host name
  checked; ``cert``/``key`` present a client certificate for mutual TLS.
* The relay (``server_context``): TLS 1.2 minimum; with ``client_ca`` every
  client must present a certificate that CA signed. The context asks for a
  certificate without making the handshake fail when none comes
  (``CERT_OPTIONAL``): the relay then refuses the session with an ERROR frame
  the client can read and print (``require_client_certificate``). A certificate
  from another CA fails the handshake itself; OpenSSL's alert does not survive
  asyncio's transport, so the client reads that as a TLS refusal
  (``TLS_REFUSED``).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal

from .errors import ConfigError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

#: Why a relay's TLS handshake with a client failed (the ``reason`` label of
#: ``audiosockets_tls_handshake_failures_total``).
HandshakeFailure = Literal[
    "not_tls",  # the client spoke something else (plain TCP, HTTP) on the TLS port
    "client_certificate_missing",
    "client_certificate_untrusted",
    "timeout",
    "handshake_failed",  # anything else: protocol versions, ciphers, a reset
]
HANDSHAKE_FAILURES: tuple[HandshakeFailure, ...] = (
    "not_tls",
    "client_certificate_missing",
    "client_certificate_untrusted",
    "timeout",
    "handshake_failed",
)

#: What a client says when a TLS relay closes the connection after the TLS
#: handshake without a single protocol frame: our relay does that only when it
#: refused the client's certificate.
TLS_REFUSED = (
    "relay {address} closed the connection after the TLS handshake: it did not accept "
    "our client certificate (give --tls-cert/--tls-key signed by the CA the relay "
    "trusts with --tls-client-ca)"
)

_NOT_TLS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "UNKNOWN_PROTOCOL",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
    }
)
_NO_CERT = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"})


def _read(path: Path, what: str) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"cannot read TLS {what} {path}: {exc.strerror or exc}") from exc


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    _read(cert, "certificate")
    if key is not None:
        _read(key, "key")

    def no_password() -> bytes:
        raise ConfigError(f"TLS key {key or cert} is encrypted; give an unencrypted key file")

    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"TLS key {key} does not match certificate {cert}") from exc
        where = f"{cert} and {key}" if key is not None else f"{cert} (no --tls-key given)"
        raise ConfigError(f"TLS certificate and key must be PEM files: {where}") from exc


def _load_ca(ctx: ssl.SSLContext, ca: Path, what: str) -> None:
    _read(ca, what)
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"TLS {what} {ca} holds no PEM certificate") from exc


def client_context(
    *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client's context for ``tls://`` relays.

    ``ca``: PEM file of the CA(s) that sign the relay's certificate (None: the
    system's trust store). ``cert``/``key``: this client's certificate and key
    (PEM; ``key`` may be omitted when ``cert`` holds both). The relay's host
    name is checked against its certificate. Raises ConfigError for files that
    cannot be read or used, or a key without a certificate.
    """
    if key is not None and cert is None:
        raise ConfigError("--tls-key needs --tls-cert (the certificate the key belongs to)")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = MINIMUM_VERSION
    if ca is not None:
        _load_ca(ctx, ca, "CA file")
    if cert is not None:
        _load_chain(ctx, cert, key)
    return ctx


def server_context(
    *, cert: Path, key: Path | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """The relay's context: its certificate and key, and the CA clients must be signed by.

    With ``client_ca`` the context requests a client certificate and verifies
    any it gets against that CA; a session without one is refused after the
    handshake (``require_client_certificate``). Raises ConfigError for files
    that cannot be read, are not PEM, or do not match.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = MINIMUM_VERSION
    _load_chain(ctx, cert, key)
    if client_ca is not None:
        _load_ca(ctx, client_ca, "client CA file")
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def requires_client_certificate(ctx: ssl.SSLContext | None) -> bool:
    """True when ``ctx`` (from ``server_context``) was given a client CA."""
    return ctx is not None and ctx.verify_mode != ssl.CERT_NONE


def handshake_failure(exc: BaseException) -> HandshakeFailure:
    """Classify a failed server-side handshake for the metric and the log line."""
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)
    ):
        return "timeout"  # asyncio's ssl_handshake_timeout aborts with that sentence
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "client_certificate_untrusted"
    if isinstance(exc, ssl.SSLError):
        if exc.reason in _NOT_TLS:
            return "not_tls"
        if exc.reason in _NO_CERT:
            return "client_certificate_missing"
    return "handshake_failed"


def verified_client_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The subject common name (CN) of the client certificate the handshake verified.

    Read from the standard library's ``getpeercert()``, which is empty unless
    the certificate was verified (``--tls-client-ca``). None without TLS, without
    a verified certificate, or when its subject has no CN or more than one.
    """
    peer = ssl_object.getpeercert() if ssl_object is not None else None
    if not peer:
        return None
    subject = peer.get("subject", ())  # ((("commonName", "rec-1"),), ...): one tuple per RDN
    names = [
        pair[1]
        for rdn in subject
        if isinstance(rdn, tuple)
        for pair in rdn
        if isinstance(pair, tuple) and pair[0] == "commonName"
    ]
    return names[0] if len(names) == 1 else None


def describe_verify_failure(exc: ssl.SSLCertVerificationError) -> str:
    """The reason OpenSSL gave for not trusting a certificate, as one phrase."""
    return exc.verify_message or exc.reason or str(exc)


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})


def untrusted_relay(address: object, host: str, exc: ssl.SSLCertVerificationError) -> str:
    """The sentence for a relay certificate we refused: for a name mismatch, that the
    certificate does not name ``host`` (the CA was fine: --tls-ca is no help); else
    which CA to give."""
    if exc.verify_code in _NAME_MISMATCH:
        flag = "--dns" if exc.verify_code == 62 else "--ip"
        return (
            f"relay {address} is not trusted: its certificate does not name {host} "
            f"({describe_verify_failure(exc)}); dial it by a name its certificate has, "
            f"or reissue it with 'audiosockets certs issue DIR NAME {flag} {host}'"
        )
    return (
        f"relay {address} is not trusted: {describe_verify_failure(exc)} "
        "(give the CA that signed its certificate with --tls-ca)"
    )

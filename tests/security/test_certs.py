"""`audiosockets certs init/issue`: a CA and certificates a TLS stack accepts."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from audiosockets.cli import main


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_init_then_issue_makes_a_chain_that_verifies(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert run("certs", "init", str(pki))[0] == 0
    code, out = run(
        "certs", "issue", str(pki), "relay", "--ip", "10.0.0.5", "--ip", "::1", "--dns", "relay.lan"
    )
    assert code == 0, out
    cert = x509.load_pem_x509_certificate((pki / "relay.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["relay.lan"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # The standard library accepts the pair and the chain.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki / "relay.pem", pki / "relay.key")
    store = ssl.create_default_context(cafile=pki / "ca.pem")
    assert any(c["subject"] for c in store.get_ca_certs())


def test_keys_are_private_and_never_overwritten(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    run("certs", "init", str(pki))
    run("certs", "issue", str(pki), "rec-1")
    for key in ("ca.key", "rec-1.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    before = (pki / "rec-1.key").read_bytes()
    code, out = run("certs", "issue", str(pki), "rec-1")
    assert code == 2
    assert "already exists" in out
    assert (pki / "rec-1.key").read_bytes() == before
    code, out = run("certs", "init", str(pki))
    assert code == 2
    assert "already holds a CA" in out


def test_default_san_is_the_name(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    run("certs", "init", str(pki))
    run("certs", "issue", str(pki), "relay.example")
    cert = x509.load_pem_x509_certificate((pki / "relay.example.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["relay.example"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["issue", "{pki}", "rec-1", "--ip", "10.0.0.300"], "is not an IPv4 or IPv6 address"),
        (["issue", "{pki}", "../escape"], "certificate name '../escape' must be"),
        (["issue", "{pki}", "ca"], "must be"),
        (["issue", "{nowhere}", "rec-1"], "run `audiosockets certs init"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    pki = tmp_path / "pki"
    run("certs", "init", str(pki))
    filled = [a.format(pki=pki, nowhere=tmp_path / "nowhere") for a in args]
    code, out = run("certs", *filled)
    assert code == 2
    assert expected in out
    assert out.count("\n") == 1

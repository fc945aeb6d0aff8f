"""Certificate and key files that cannot be used: one line, exit 2, before anything connects."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner
from security_support import Site

from audiosockets.cli import main
from audiosockets.cli_security import read_token
from audiosockets.errors import ConfigError
from audiosockets.tls import client_context, server_context
from audiosockets.urls import parse_url


def test_contexts_require_tls_1_2_and_verify_the_relay(site: Site) -> None:
    client = client_context(ca=site.ca, cert=site.client.cert, key=site.client.key)
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.check_hostname
    assert client.verify_mode == ssl.CERT_REQUIRED
    server = server_context(cert=site.relay.cert, key=site.relay.key, client_ca=site.ca)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode != ssl.CERT_NONE


def test_tls_urls() -> None:
    address = parse_url("tls://[::1]:7443")
    assert (address.host, address.port, address.tls) == ("::1", 7443, True)
    assert str(address) == "tls://[::1]:7443"
    assert not parse_url("relay:7400").tls
    with pytest.raises(ConfigError, match="must start with tcp:// or tls://"):
        parse_url("https://relay:7400")


def test_unusable_files_are_config_errors(site: Site, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(
        ConfigError, match=r"cannot read TLS certificate .*missing\.pem: No such file"
    ):
        server_context(cert=missing, key=site.relay.key)
    with pytest.raises(ConfigError, match=r"cannot read TLS key .*missing\.pem"):
        server_context(cert=site.relay.cert, key=missing)
    with pytest.raises(
        ConfigError, match=r"TLS key .*rec-1\.key does not match certificate .*relay\.pem"
    ):
        server_context(cert=site.relay.cert, key=site.client.key)
    with pytest.raises(ConfigError, match="must be PEM files"):
        server_context(cert=not_pem, key=site.relay.key)
    with pytest.raises(ConfigError, match=r"client CA file .*junk\.pem holds no PEM certificate"):
        server_context(cert=site.relay.cert, key=site.relay.key, client_ca=not_pem)
    with pytest.raises(ConfigError, match=r"cannot read TLS CA file"):
        client_context(ca=missing)
    with pytest.raises(ConfigError, match="--tls-key needs --tls-cert"):
        client_context(key=site.client.key)


def test_an_encrypted_key_is_refused_without_prompting(site: Site, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(site.client.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(ConfigError, match="is encrypted"):
        client_context(cert=site.client.cert, key=locked)


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def test_status_with_unusable_tls_files_exits_2_in_one_line(site: Site, tmp_path: Path) -> None:
    code, out = run(
        "status", "--relay", "tls://127.0.0.1:9", "--tls-ca", str(tmp_path / "nope.pem")
    )
    assert code == 2
    assert out.strip().startswith("audiosockets: error: cannot read TLS CA file")
    assert out.count("\n") == 1
    code, out = run(
        "status", "--relay", "tls://127.0.0.1:9", "--tls-cert", str(site.relay.cert),
        "--tls-key", str(site.client.key),
    )  # fmt: skip
    assert code == 2
    assert "does not match certificate" in out


def test_tls_files_for_a_plain_tcp_relay_are_a_config_error(site: Site) -> None:
    code, out = run("status", "--relay", "tcp://127.0.0.1:9", "--tls-ca", str(site.ca))
    assert code == 2
    assert "--tls-ca needs a tls:// relay URL" in out
    assert "tls://127.0.0.1:9" in out


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    assert read_token(None, path) == "s3cret"
    assert read_token("inline", None) == "inline"
    assert read_token(None, None) == ""
    with pytest.raises(ConfigError, match="not both"):
        read_token("inline", path)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(None, tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read token file"):
        read_token(None, tmp_path / "missing")

"""`edgeproxy certs self-signed`: a certificate for the names given, a private key kept private."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509

from edgeproxy.cli import main


def test_self_signed_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "certs"
    args = ["certs", "self-signed", "--name", "mirror.test", "--name", "127.0.0.1"]
    assert main([*args, "--dir", str(directory)]) == 0
    certificate = x509.load_pem_x509_certificate((directory / "server.crt").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mirror.test"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert certificate.issuer == certificate.subject
    assert stat.S_IMODE((directory / "server.key").stat().st_mode) == 0o600
    # Never replaced silently.
    assert main([*args, "--dir", str(directory)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--dir", str(directory), "--force"]) == 0


def test_days_past_year_9999_is_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["certs", "self-signed", "--name", "x", "--days", "100000000", "--dir", str(tmp_path)]
    assert main(args) == 1
    assert capsys.readouterr().err.startswith("edgeproxy: ")

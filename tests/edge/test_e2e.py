"""The edge as a process, with a certificate made by `edgeproxy certs`: skopeo through https in
front of the embedded mirror and in front of a private registry:2 (push and pull), the 301 from
the http listener, TLS 1.2+, the access log, 413 and 502 as nginx answers them."""

from __future__ import annotations

import json
import re
import socket
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.edge import Edge, ca_dir, run_edge
from tests.support.images import Pushed
from tests.support.registry import Registry, start_registry
from tests.support.skopeo import skopeo

pytestmark = pytest.mark.e2e

OFFLINE_UPSTREAM = {"name": "docker.io", "url": "http://127.0.0.1:1"}
MAIN_LINE = re.compile(
    r'^(?P<server_name>\S+) (?P<remote>\S+) - (?P<user>\S+) \[[^\]]+\] "(?P<request>[^"]*)" - '
    r'(?P<body>\S+) (?P<status>\d{3}) (?P<bytes>\d+) "[^"]*" "[^"]*" "[^"]*" '
    r"(?P<protocol>\S+) (?P<cipher>\S+) (?P<time>\d+\.\d{3}) $"
)


def pulled_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


def pull(edge: Edge, repo: str, destination: Path, cert_dir: Path) -> None:
    skopeo(
        "copy", "--all", "--src-cert-dir", str(cert_dir), "--src-no-creds", "--preserve-digests",
        f"docker://{edge.https_host}/{repo}", f"oci:{destination}:v1",
    )  # fmt: skip


def tls_exchange(edge: Edge, request: bytes) -> bytes:
    """Send raw bytes over TLS and return what the server answers until it closes."""
    assert edge.certificate is not None and edge.https_port is not None
    context = ssl.create_default_context(cafile=edge.certificate)
    with (
        socket.create_connection(("127.0.0.1", edge.https_port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def handshake(edge: Edge, version: ssl.TLSVersion) -> str | None:
    """Complete a TLS handshake offering only `version`; return the protocol agreed."""
    assert edge.certificate is not None and edge.https_port is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(edge.certificate)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1
        context.minimum_version = context.maximum_version = version
    with (
        socket.create_connection(("127.0.0.1", edge.https_port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        return conn.version()


def log_entries(edge: Edge) -> list[dict[str, Any]]:
    entries = []
    for line in edge.access_lines():
        match = MAIN_LINE.match(line)
        assert match, f"not the main format: {line!r}"
        entries.append(match.groupdict())
    return entries


def test_skopeo_pulls_through_https_from_the_embedded_mirror(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    pushed = push_all(registry_none)
    upstream = {"name": "docker.io", "url": registry_none.url}
    with run_edge(tmp_path / "edge", [upstream], client_max_body_size="1m") as edge:
        assert edge.certificate is not None
        cert_dir = ca_dir(edge.certificate, tmp_path / "ca")
        for name in ("multi", "multiarch"):
            item = pushed[name]
            destination = tmp_path / f"pulled-{name}"
            pull(edge, f"{item.repo}:{item.tag}", destination, cert_dir)
            assert pulled_digest(destination) == item.image.manifest_digest

        # The http listener: 301 to https://<server_name>:<https port><request URI>.
        redirect = httpx.get(f"{edge.http_url}/v2/test/multi/tags/list?n=1")
        assert redirect.status_code == 301
        assert redirect.headers["location"] == f"{edge.https_url}/v2/test/multi/tags/list?n=1"

        with httpx.Client(verify=ssl.create_default_context(cafile=edge.certificate)) as client:
            base = client.get(f"{edge.https_url}/v2/")
            assert base.status_code == 200
            assert base.headers["docker-distribution-api-version"] == "registry/2.0"
            assert "server" not in base.headers

        # A body over client_max_body_size, by its Content-Length: 413 before it is read.
        head = tls_exchange(
            edge,
            b"PUT /v2/test/multi/blobs/uploads/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 2097152\r\n\r\n",
        )
        assert head.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
        assert b"connection: close" in head.lower()

        # TLS 1.2+ only: a client offering TLS 1.1 at most is refused, 1.2 is served.
        assert handshake(edge, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        with pytest.raises(ssl.SSLError):
            handshake(edge, ssl.TLSVersion.TLSv1_1)

    entries = log_entries(edge)
    blobs = [e for e in entries if "/blobs/sha256:" in e["request"] and e["status"] == "200"]
    assert blobs, entries
    assert all(e["protocol"] in ("TLSv1.2", "TLSv1.3") and e["cipher"] != "-" for e in blobs)
    assert all(e["server_name"] == "127.0.0.1" and e["remote"] == "127.0.0.1" for e in blobs)
    redirects = [e for e in entries if e["status"] == "301"]
    assert redirects and redirects[0]["protocol"] == "-"
    assert any(e["status"] == "413" for e in entries)


def test_points_to_a_private_registry_push_pull_and_502(
    push_all: Callable[[Registry], dict[str, Pushed]],
    test_images: dict[str, Any],
    tmp_path: Path,
) -> None:
    registry = start_registry(tmp_path / "private")
    try:
        with run_edge(tmp_path / "edge", [OFFLINE_UPSTREAM], backend=registry.url) as edge:
            assert edge.certificate is not None
            cert_dir = ca_dir(edge.certificate, tmp_path / "ca")
            image = test_images["multi"]
            skopeo(
                "copy", "--all", "--preserve-digests", "--dest-cert-dir", str(cert_dir),
                "--dest-no-creds", f"oci:{image.layout}:{image.tag}",
                f"docker://{edge.https_host}/private/multi:v1",
            )  # fmt: skip
            destination = tmp_path / "pulled"
            pull(edge, "private/multi:v1", destination, cert_dir)
            assert pulled_digest(destination) == image.manifest_digest
            # The registry saw the pushes and the pulls (through the edge, not around it).
            assert registry.wait_count("PUT", "/manifests/v1", 1) == 1
            assert registry.count("GET", f"/blobs/{image.layer_digests[0]}") >= 1

            registry.stop()
            with httpx.Client(verify=ssl.create_default_context(cafile=edge.certificate)) as c:
                down = c.get(f"{edge.https_url}/v2/")
            assert down.status_code == 502
            assert "502 Bad Gateway" in down.text
        assert "Traceback" not in edge.process.log()
    finally:
        registry.close()


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"]
)
def test_tls_sessions_resume_with_any_worker(tmp_path: Path, version: ssl.TLSVersion) -> None:
    """Every worker takes the session tickets of the others, as nginx's (whose master makes
    the context they fork with): each worker made its own keys, and a client (curl, any
    keeping its sessions) resumed only when it came back to the same worker."""
    with run_edge(tmp_path / "edge", [OFFLINE_UPSTREAM], workers=4) as edge:
        assert edge.certificate is not None and edge.https_port is not None
        context = ssl.create_default_context(cafile=edge.certificate)
        context.minimum_version = context.maximum_version = version
        session, resumed = None, []
        for _ in range(12):
            with (
                socket.create_connection(("127.0.0.1", edge.https_port), timeout=30) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as conn,
            ):
                conn.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while conn.recv(65536):  # TLS 1.3 sends its ticket after the handshake
                    pass
                resumed.append(conn.session_reused)
                session = session or conn.session
    assert resumed == [False] + [True] * 11

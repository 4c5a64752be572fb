"""edgeproxy with an `[edge]`: a self-signed certificate made by `edgeproxy certs`, free ports."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.types import Receive, Scope, Send

from edgeproxy.config import EdgeConfig
from edgeproxy.edge.accesslog import AccessLog
from edgeproxy.edge.app import EdgeApp
from edgeproxy.edge.protocol import EdgeHttpProtocol
from edgeproxy.edge.proxy import ProxyBackend
from tests.support.ports import free_port
from tests.support.servers import EdgeproxyProcess, serve_app, write_toml


@contextmanager
def serve_edge_app(app: Any) -> Iterator[str]:
    """Run an edge ASGI app on 127.0.0.1 in a thread, as edgeproxy serves it: the client
    address is the socket's (uvicorn's proxy_headers off), no Server header, the edge's HTTP
    protocol (nginx's head limits). Yield its URL."""
    options: dict[str, Any] = {
        "http": EdgeHttpProtocol,
        "proxy_headers": False,
        "server_header": False,
    }
    with serve_app(app, **options) as url:
        yield url


class ProxyEdge:
    """EdgeApp + ProxyBackend in front of `backend_url`, as served (no access log); `edge`
    are [edge] keys. Closes the backend's client on shutdown, for `serve_edge_app`."""

    def __init__(self, backend_url: str, **edge: Any) -> None:
        config = EdgeConfig(http="127.0.0.1:1", backend=backend_url, **edge)
        self.proxy = ProxyBackend(config.backend_url, config.connect_timeout, config.read_timeout)
        self.app = EdgeApp(config, self.proxy, AccessLog("off"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.proxy.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await self.app(scope, receive, send)


def make_certificate(directory: Path, *names: str) -> tuple[Path, Path]:
    """`edgeproxy certs self-signed --name ... --dir directory`: (certificate, key)."""
    arguments = [arg for name in names for arg in ("--name", name)]
    command = [sys.executable, "-m", "edgeproxy.cli", "certs", "self-signed", *arguments]
    subprocess.run(
        [*command, "--dir", str(directory)],
        check=True,
        capture_output=True,
    )
    return directory / "server.crt", directory / "server.key"


def ca_dir(certificate: Path, directory: Path) -> Path:
    """A directory holding only the CA as `*.crt`, for `skopeo --src-cert-dir`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(certificate.read_bytes())
    return directory


@dataclass
class Edge:
    """A running edgeproxy with edge listeners on 127.0.0.1."""

    process: EdgeproxyProcess
    http_port: int
    https_port: int | None
    certificate: Path | None
    access_log: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def https_host(self) -> str:
        return f"127.0.0.1:{self.https_port}"

    def access_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


@contextmanager
def run_edge(
    workdir: Path,
    upstreams: list[dict[str, Any]],
    *,
    tls: bool = True,
    auth: Any = None,  # a dict, as [mirror.auth] (Any: callers pass **edge of str values)
    **edge: Any,
) -> Iterator[Edge]:
    """Start edgeproxy with `[edge]` (+ TLS with a fresh self-signed certificate if `tls`,
    `auth` as `[mirror.auth]`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    https_port = free_port() if tls else None
    access_log = workdir / "access.log"
    section: dict[str, Any] = {
        "http": f"127.0.0.1:{http_port}",
        "server_name": "127.0.0.1",
        "access_log": str(access_log),
        **edge,
    }
    certificate = None
    if tls:
        certificate, key = make_certificate(workdir / "certs", "127.0.0.1", "localhost")
        section["https"] = f"127.0.0.1:{https_port}"
        section["tls"] = {"certificate": str(certificate), "key": str(key)}
    mirror: dict[str, Any] = {"root": str(workdir / "cache"), "upstream": upstreams}
    if auth is not None:
        mirror["auth"] = auth
    config = {"mirror": mirror, "edge": section}
    process = EdgeproxyProcess(write_toml(workdir / "proxy.toml", config), https_port or http_port)
    process.start()
    try:
        yield Edge(process, http_port, https_port, certificate, access_log)
    finally:
        process.stop()

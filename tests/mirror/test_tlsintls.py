"""The blob threads through an https:// proxy (a real tinyproxy behind a TLS listener): TLS
with the proxy, then CONNECT and the upstream's TLS inside it (`TLSInTLS`), or plain HTTP
requests inside it; both certificates checked with the upstream's context."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeproxy.mirror.blobstream import BlobRequest, BlobStream, BlobStreamError, ConnectionPool
from edgeproxy.mirror.proxies import Proxies, Proxy, parse_proxy
from tests.mirror.test_blobstream import BLOCK, BODY, chunked, stall, stalled, whole
from tests.support.edge import make_certificate
from tests.support.servers import serve_app
from tests.support.tinyproxy import Tinyproxy, run_tinyproxy, tls_front
from tests.support.wait import wait_until


async def closing(request: Request) -> Response:
    """http.client closes the connection as the head comes: the body is read after that."""
    return Response(BODY, headers={"Connection": "close"})


APP = Starlette(
    routes=[
        Route("/whole", whole),
        Route("/chunked", chunked),
        Route("/closing", closing),
        Route("/stall", stall),
    ]
)


class Through(Proxies):
    """Every origin through one proxy, loopback ones too (Go's rule sends those direct)."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__({})
        self._proxy = proxy

    def choose(self, scheme: str, netloc: str) -> Proxy | None:
        return self._proxy


@dataclass
class Setup:
    https_url: str  # the upstream, its certificate for 127.0.0.1 (the proxy's too)
    http_url: str
    context: ssl.SSLContext  # trusts that certificate
    proxy: Tinyproxy  # https:// behind its TLS listener
    handshakes: list[int]
    untrusted: tuple[Path, Path]  # another certificate for 127.0.0.1, not trusted

    def pool(self) -> ConnectionPool:
        return ConnectionPool(self.context, 5.0, 60.0, Through(parse_proxy(self.proxy.url())))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("tlsintls")
    certificate, key = make_certificate(workdir / "tls", "127.0.0.1")
    untrusted = make_certificate(workdir / "untrusted", "127.0.0.1")
    context = ssl.create_default_context(cafile=certificate)
    context.set_alpn_protocols(["http/1.1"])  # as the upstream client's blob context
    with (
        serve_app(APP, ssl_certfile=str(certificate), ssl_keyfile=str(key)) as https_url,
        serve_app(APP) as http_url,
        run_tinyproxy(workdir / "proxy") as proxy,
        tls_front(proxy, certificate, key) as handshakes,
    ):
        https = https_url.replace("http://", "https://")
        yield Setup(https, http_url, context, proxy, handshakes, untrusted)


async def read(url: str, pool: ConnectionPool) -> list[bytearray]:
    stream = BlobStream(BlobRequest(url, {}, pool), BLOCK)
    try:
        await stream.open()
        assert stream.status == 200
        return [block async for block in stream.blocks()]
    finally:
        stream.close()


@pytest.mark.parametrize("path", ["/whole", "/chunked", "/closing"])
def test_https_inside_an_https_proxy(setup: Setup, path: str) -> None:
    """The whole body in blocks, through the proxy's CONNECT; one that ends its connection
    (Connection: close) too, read after http.client closed the connection."""
    before = len(setup.proxy.requests())
    pool = setup.pool()
    blocks = asyncio.run(read(setup.https_url + path, pool))
    pool.close()
    assert [len(block) for block in blocks] == [BLOCK, BLOCK, BLOCK, 5]
    assert b"".join(blocks) == BODY
    netloc = setup.https_url.removeprefix("https://")
    assert setup.proxy.requests()[before:] == [f"CONNECT {netloc} HTTP/1.0"]


def test_http_inside_an_https_proxy(setup: Setup) -> None:
    """A plain-HTTP upstream: the request in absolute form, inside TLS with the proxy."""
    before = len(setup.proxy.requests())
    pool = setup.pool()
    blocks = asyncio.run(read(setup.http_url + "/whole", pool))
    pool.close()
    assert b"".join(blocks) == BODY
    assert setup.proxy.requests()[before:] == [f"GET {setup.http_url}/whole HTTP/1.1"]


def test_the_tunnel_is_kept_alive_between_blobs(setup: Setup) -> None:
    before = len(setup.proxy.requests())
    pool = setup.pool()
    for _ in range(3):
        assert b"".join(asyncio.run(read(setup.https_url + "/whole", pool))) == BODY
    pool.close()
    assert len(setup.proxy.requests()[before:]) == 1


def test_close_cuts_a_stalled_read_inside_the_tunnel(setup: Setup) -> None:
    """close() shuts the proxy's socket down under the thread's read: it ends at once."""
    threads: list[threading.Thread] = []
    pool = setup.pool()

    async def main() -> None:
        stalled.clear()
        stream = BlobStream(BlobRequest(setup.https_url + "/stall", {}, pool), BLOCK)
        await stream.open()
        threads.extend(t for t in threading.enumerate() if t.name == "edgeproxy-blob")
        await asyncio.to_thread(stalled.wait, 10)
        stream.close()

    asyncio.run(main())
    pool.close()
    assert threads
    assert wait_until(lambda: not any(t.is_alive() for t in threads), timeout=10)


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_proxy_certificate_not_trusted_is_an_error(setup: Setup, scheme: str) -> None:
    """The proxy's certificate is checked with the upstream's context: one it does not trust
    fails the connection, saying so, before any request."""
    url = setup.https_url if scheme == "https" else setup.http_url
    before = len(setup.proxy.requests())
    with tls_front(setup.proxy, *setup.untrusted) as handshakes:
        pool = setup.pool()
        with pytest.raises(
            BlobStreamError, match=r"through the proxy: .*CERTIFICATE_VERIFY_FAILED"
        ):
            asyncio.run(read(url + "/whole", pool))
        pool.close()
    assert handshakes == [0]
    assert setup.proxy.requests()[before:] == []

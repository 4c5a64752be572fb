"""Limits parity over raw sockets: the same requests to nginx (the seed's header buffers, a
1m client_max_body_size) and to edgeproxy (points-to backend, its HTTP protocol), both in front
of one backend: status, page title and Connection; and the server keeps serving after."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Receive, Scope, Send

from tests.support.edge import ProxyEdge, serve_edge_app
from tests.support.nginx import run_nginx
from tests.support.rawhttp import Answer, exchange
from tests.support.servers import serve_app

pytestmark = pytest.mark.e2e

LIMIT = 1 << 20


class Counter:
    """A backend answering with the size of each request body it received whole."""

    def __init__(self) -> None:
        self.whole: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # cut short: never taken for a whole body
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.whole.append(size)
        body = b"got %d" % size
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def get(uri: int = 1, headers: tuple[int, ...] = ()) -> bytes:
    lines = [b"GET /" + b"a" * (uri - 1) + b" HTTP/1.1", b"Host: x", b"Connection: close"]
    lines += [b"X-%d: " % i + b"b" * size for i, size in enumerate(headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunked(size: int, piece: int = 1 << 16) -> bytes:
    chunks = [b"%x\r\n" % piece + b"z" * piece + b"\r\n" for _ in range(size // piece)]
    return b"".join(chunks) + b"0\r\n\r\n"


UPLOAD = b"PATCH /v2/x/blobs/uploads/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
UPLOAD += b"Connection: close\r\n\r\n"
CASES: dict[str, tuple[bytes, bytes]] = {
    "request line 20k": (get(20000), b""),
    "request line 40k": (get(40000), b""),
    "header 20k": (get(1, (20000,)), b""),
    "header 40k": (get(1, (40000,)), b""),
    "4 headers of 15k": (get(1, (15000,) * 4), b""),
    "7 headers of 20k": (get(1, (20000,) * 7), b""),
    "200 headers of 1k": (get(1, (1000,) * 200), b""),
    "chunked body under the limit": (UPLOAD, chunked(LIMIT // 2)),
    "chunked body over the limit": (UPLOAD, chunked(3 * LIMIT)),
}


def outcome(answer: Answer) -> tuple[int, str | None, str]:
    title = re.search(rb"<title>(.*)</title>", answer.body)
    text = title.group(1) if title else answer.body
    return answer.status, answer.header("connection"), text.decode()


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, int, Counter]]:
    counter = Counter()
    prefix = Path(tmp_path_factory.mktemp("nginx"))
    with (
        serve_app(counter) as backend,
        run_nginx(prefix, backend, client_max_body_size="1m") as nginx_port,
        serve_edge_app(ProxyEdge(backend, client_max_body_size="1m")) as edge_url,
    ):
        yield nginx_port, int(edge_url.rsplit(":", 1)[1]), counter


@pytest.mark.parametrize("case", list(CASES))
def test_limits_as_nginx(case: str, servers: tuple[int, int, Counter]) -> None:
    nginx_port, edge_port, counter = servers
    request, body = CASES[case]
    theirs = outcome(exchange(nginx_port, request, body=body))
    ours = outcome(exchange(edge_port, request, body=body))
    assert ours == theirs
    assert all(size <= LIMIT for size in counter.whole)  # never a cut body taken as whole
    # And each still serves the next client.
    assert exchange(nginx_port, get()).status == exchange(edge_port, get()).status == 200


def test_the_cases_cover_each_answer(servers: tuple[int, int, Counter]) -> None:
    nginx_port, _, _ = servers
    statuses = {exchange(nginx_port, r, body=b).status for r, b in CASES.values()}
    assert statuses == {200, 400, 413, 414}

"""The edge with the points-to backend, in front of a recording backend: what the backend
receives, what the client gets back, streaming both ways, 502 and 504."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from tests.support.edge import ProxyEdge, serve_edge_app
from tests.support.ports import free_port
from tests.support.servers import serve_app

BIG = 3 << 20


class Recorder:
    """A backend that records each request and answers by path."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        self.requests.append(
            {
                "method": scope["method"],
                "uri": scope["raw_path"] + b"?" + scope["query_string"],
                "headers": headers,
                "size": size,
                "sha256": digest.hexdigest(),
            }
        )
        path = scope["path"]
        if path == "/stall":
            await receive()  # no answer: wait until the edge gives up and disconnects
            return
        if path == "/stream":  # no Content-Length: chunked, in pieces
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(3):
                piece = bytes([i]) * (1 << 20)
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b"ok"
        out = [
            (b"server", b"registry/2.0"),
            (b"date", b"Thu, 01 Jan 1970 00:00:00 GMT"),
            (b"location", b"/v2/elsewhere/blobs/uploads/x?_state=abc%2F"),
            (b"connection", b"x-hop"),
            (b"x-hop", b"1"),
            (b"x-kept", b"1"),
            (b"x-range", dict(headers).get(b"range", b"")),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 202, "headers": out})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def edge_url(recorder: Recorder) -> Iterator[str]:
    with (
        serve_app(recorder) as backend,
        serve_edge_app(ProxyEdge(backend, read_timeout=0.5, client_max_body_size="10m")) as edge,
    ):
        yield edge


def test_headers_both_ways(recorder: Recorder, edge_url: str) -> None:
    response = httpx.get(
        f"{edge_url}/v2/x/blobs/uploads/y?a=%2F&b",
        headers={
            "Host": "mirror.example.com",
            "X-Forwarded-For": "203.0.113.7",
            "Connection": "keep-alive, X-Drop",
            "X-Drop": "1",
            "Range": "bytes=0-9",
            "User-Agent": "docker/20.10",
            "Accept-Encoding": "identity",
        },
    )
    assert response.status_code == 202
    assert response.text == "ok"
    # Location untouched (proxy_redirect off); hop-by-hop gone; no Server; the edge's own Date.
    assert response.headers["location"] == "/v2/elsewhere/blobs/uploads/x?_state=abc%2F"
    assert response.headers["x-kept"] == "1"
    assert "x-hop" not in response.headers
    assert "server" not in response.headers
    assert response.headers["date"] != "Thu, 01 Jan 1970 00:00:00 GMT"
    assert response.headers["x-range"] == "bytes=0-9"  # Range passed through
    seen = recorder.requests[-1]
    assert seen["uri"] == b"/v2/x/blobs/uploads/y?a=%2F&b"  # the URI as the client sent it
    names = [name for name, _ in seen["headers"]]
    headers = dict(seen["headers"])
    assert headers[b"host"] == b"mirror.example.com"
    assert headers[b"x-forwarded-proto"] == b"http"
    assert headers[b"x-real-ip"] == b"127.0.0.1"
    assert headers[b"x-forwarded-for"] == b"203.0.113.7, 127.0.0.1"
    assert headers[b"user-agent"] == b"docker/20.10"
    assert b"x-drop" not in names
    assert names.count(b"host") == 1
    # Nothing added: aiohttp's own Accept, Accept-Encoding and User-Agent are not sent.
    for name in (b"accept", b"accept-encoding", b"user-agent"):
        assert names.count(name) == 1
    assert headers[b"accept-encoding"] == b"identity"


@pytest.mark.parametrize("chunked", [False, True])
def test_request_bodies_streamed_to_the_backend(
    recorder: Recorder, edge_url: str, chunked: bool
) -> None:
    body = hashlib.sha256(b"seed").digest() * (BIG // 32)

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]

    content: Any = pieces() if chunked else body
    response = httpx.patch(f"{edge_url}/v2/x/blobs/uploads/u", content=content, timeout=30)
    assert response.status_code == 202
    seen = recorder.requests[-1]
    assert (seen["size"], seen["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    headers = dict(seen["headers"])
    assert headers.get(b"content-length") == (None if chunked else str(len(body)).encode())


def test_response_without_length_streamed_chunked(edge_url: str) -> None:
    response = httpx.get(f"{edge_url}/stream", timeout=30)
    assert response.status_code == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.content == b"\x00" * (1 << 20) + b"\x01" * (1 << 20) + b"\x02" * (1 << 20)


def test_body_over_the_limit_refused_before_the_backend(recorder: Recorder, edge_url: str) -> None:
    before = len(recorder.requests)
    response = httpx.put(f"{edge_url}/v2/x/blobs/uploads/u", content=b"x" * (11 << 20))
    assert response.status_code == 413
    assert "413 Request Entity Too Large" in response.text
    assert len(recorder.requests) == before


def test_backend_timeout_is_504(edge_url: str) -> None:
    response = httpx.get(f"{edge_url}/stall", timeout=30)
    assert response.status_code == 504
    assert "504 Gateway Time-out" in response.text


def test_backend_down_is_502() -> None:
    with serve_edge_app(
        ProxyEdge(f"http://127.0.0.1:{free_port()}", client_max_body_size="10m")
    ) as edge:
        response = httpx.get(f"{edge}/v2/", timeout=30)
        head = httpx.head(f"{edge}/v2/", timeout=30)
    assert response.status_code == 502
    assert response.headers["content-type"] == "text/html"
    assert "502 Bad Gateway" in response.text
    assert head.status_code == 502
    assert head.content == b""


class EndlessBackend:
    """A backend that sends a 1 GiB body in 1 MiB pieces to its one client, and counts what
    its socket took before the edge closed the connection."""

    SIZE = 1 << 30

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sent = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn, self.listener:
            while b"\r\n\r\n" not in conn.recv(65536):
                pass
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.SIZE
            piece = b"x" * (1 << 20)
            try:
                conn.sendall(head)
                while self.sent < self.SIZE:
                    conn.sendall(piece)
                    self.sent += len(piece)
            except OSError:
                pass  # the edge closed it


def test_a_client_that_leaves_stops_the_backend_download() -> None:
    """nginx closes the upstream connection when its client aborts; the edge used to read
    the rest of a multi-GB layer from the backend and drop it (uvicorn's send() returns
    quietly once the client is gone)."""
    backend = EndlessBackend()
    with serve_edge_app(ProxyEdge(backend.url, read_timeout=30)) as edge:
        with httpx.Client(timeout=30) as client, client.stream("GET", f"{edge}/v2/x/blobs/y") as r:
            assert r.status_code == 200
            next(r.iter_raw())  # some of it, then gone
        backend.thread.join(timeout=120)
    assert not backend.thread.is_alive()
    assert backend.sent < EndlessBackend.SIZE // 4


def test_a_304_with_a_length_keeps_the_connection() -> None:
    """RFC 9110 lets a 304 carry the 200's Content-Length; uvicorn waited for that body, logged
    a traceback and closed the connection, so a pipelined request went unanswered (nginx
    answers both)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_304s() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            pending = b""
            while chunk := conn.recv(65536):
                pending += chunk
                while b"\r\n\r\n" in pending:
                    _, _, pending = pending.partition(b"\r\n\r\n")
                    conn.sendall(
                        b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "x"\r\n\r\n'
                    )

    threading.Thread(target=answer_304s, daemon=True).start()
    backend = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with serve_edge_app(ProxyEdge(backend, read_timeout=30)) as edge:
        port = int(edge.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            request = b"GET /v2/x/manifests/v1 HTTP/1.1\r\nHost: x\r\n"
            conn.sendall(request + b"\r\n" + request + b"Connection: close\r\n\r\n")
            answers = b""
            while chunk := conn.recv(65536):
                answers += chunk
    assert answers.count(b"HTTP/1.1 304 ") == 2, answers


def test_an_answer_without_a_length_to_http_1_0_ends_with_the_connection(edge_url: str) -> None:
    """RFC 9112: never chunked to an HTTP/1.0 request. nginx sends the body as it comes and
    closes; uvicorn chunked it, and an HTTP/1.0 client (curl -0, health checkers) read the
    chunk sizes as part of the body."""
    port = int(edge_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := conn.recv(1 << 20):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"".join(bytes([i]) * (1 << 20) for i in range(3))


def test_request_trailers_never_become_headers(recorder: Recorder, edge_url: str) -> None:
    """nginx drops a chunked body's trailers. uvicorn added them to the request's headers,
    after the edge had checked the head: a trailer Host replaced the one checked."""
    port = int(edge_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(
            b"POST /t HTTP/1.1\r\nHost: mirror.example\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\nHost: ../evil\r\nX-Trailer: 1\r\n\r\n"
        )
        assert conn.recv(12) == b"HTTP/1.1 202"
    seen = recorder.requests[-1]
    assert (seen["uri"], seen["size"]) == (b"/t?", 3)
    names = [name for name, _ in seen["headers"]]
    assert dict(seen["headers"])[b"host"] == b"mirror.example"
    assert names.count(b"host") == 1 and b"x-trailer" not in names

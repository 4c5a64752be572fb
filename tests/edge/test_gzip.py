"""The seed's gzip: the decision (request side, response side), the headers of a compressed
response, and the middleware streaming one zlib stream per response at level 6."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeproxy.config import EdgeConfig
from edgeproxy.edge.accesslog import AccessLog
from edgeproxy.edge.app import EdgeApp
from edgeproxy.edge.gzip import (
    GzipMiddleware,
    accepts_gzip,
    client_wants_gzip,
    compressed_headers,
    eligible,
)

JSON = b'{"errors":[{"code":"NAME_UNKNOWN","message":"' + b"x" * 300 + b'"}]}'


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (b"gzip", True),
        (b"GZIP", True),
        (b"br, gzip", True),
        (b"gzip;q=0.5", True),
        (b"deflate, gzip;q=0.001", True),
        (b"gzip;q=0", False),
        (b"gzip ; q=0", False),
        (b"deflate, gzip;q=0.0", False),
        (b"identity, gzip;q=0.", False),
        (b"x-gzip, deflate", False),
        (b"gzipx", False),
        (b"*", False),
        (b"", False),
    ],
)
def test_accept_encoding_as_nginx(value: bytes, accepted: bool) -> None:
    assert accepts_gzip(value) is accepted


def scope(
    version: str = "1.1", method: str = "GET", *headers: tuple[bytes, bytes]
) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": version,
        "method": method,
        "headers": [(b"accept-encoding", b"gzip"), *headers],
    }


def test_request_side() -> None:
    assert client_wants_gzip(scope())
    assert client_wants_gzip(scope("2"))
    assert not client_wants_gzip(scope("1.0"))  # gzip_http_version 1.1
    msie6 = (b"user-agent", b"Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1)")
    assert not client_wants_gzip(scope("1.1", "GET", msie6))
    assert not client_wants_gzip(scope("1.1", "GET", (b"user-agent", b"msie 5.5")))
    assert client_wants_gzip(scope("1.1", "GET", (b"user-agent", b"MSIE 6.0; SV1")))
    assert client_wants_gzip(scope("1.1", "GET", (b"user-agent", b"MSIE 7.0")))
    assert client_wants_gzip(scope("1.1", "GET", (b"via", b"1.1 proxy")))  # proxied any
    no_accept: Any = {"http_version": "1.1", "headers": []}
    assert not client_wants_gzip(no_accept)


def json_headers(length: int | None = 300, kind: bytes = b"application/json") -> list[Any]:
    headers = [(b"content-type", kind)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return headers


def test_response_side() -> None:
    assert eligible(200, json_headers())
    assert eligible(404, json_headers())
    assert eligible(403, json_headers())
    assert eligible(200, json_headers(None))  # length unknown: min_length does not apply
    assert eligible(200, json_headers(256))
    assert not eligible(200, json_headers(255))
    for status in (206, 301, 401, 500):
        assert not eligible(status, json_headers())
    assert eligible(200, json_headers(kind=b"Application/JSON; charset=utf-8"))
    assert eligible(200, json_headers(kind=b"text/html"))
    assert not eligible(200, json_headers(kind=b"application/json ; charset=utf-8"))
    manifest = b"application/vnd.docker.distribution.manifest.v2+json"
    assert not eligible(200, json_headers(kind=manifest))
    assert not eligible(200, json_headers(kind=b"application/octet-stream"))
    assert not eligible(200, [*json_headers(), (b"content-encoding", b"br")])


def test_compressed_headers() -> None:
    out = compressed_headers(
        [*json_headers(), (b"accept-ranges", b"bytes"), (b"etag", b'"abc"'), (b"x", b"1")]
    )
    assert out == [
        (b"content-type", b"application/json"),
        (b"etag", b'W/"abc"'),
        (b"x", b"1"),
        (b"content-encoding", b"gzip"),
    ]
    assert (b"etag", b'W/"a"') in compressed_headers([(b"etag", b'W/"a"')])
    assert compressed_headers([(b"etag", b"bare")]) == [(b"content-encoding", b"gzip")]


def run(
    app_scope: dict[str, Any], start_headers: list[Any], pieces: list[bytes], status: int = 200
) -> list[Message]:
    """The messages GzipMiddleware sends for a backend answering with `pieces`."""

    async def backend(_scope: Scope, _receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": start_headers})
        for i, piece in enumerate(pieces):
            more = i < len(pieces) - 1
            await send({"type": "http.response.body", "body": piece, "more_body": more})

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(GzipMiddleware(backend)(app_scope, receive, send))
    return sent


def body(messages: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages[1:])


def test_compresses_at_level_6_with_vary() -> None:
    messages = run(scope(), json_headers(len(JSON)), [JSON])
    headers = messages[0]["headers"]
    assert (b"vary", b"Accept-Encoding") in headers
    assert (b"content-encoding", b"gzip") in headers
    assert not any(name == b"content-length" for name, _ in headers)
    assert gzip.decompress(body(messages)) == JSON
    level6 = zlib.compressobj(6, zlib.DEFLATED, 31)
    assert body(messages) == level6.compress(JSON) + level6.flush()


def test_vary_without_compression_when_not_wanted() -> None:
    for request in (scope("1.0"), {**scope(), "headers": []}):
        messages = run(request, json_headers(len(JSON)), [JSON])
        headers = messages[0]["headers"]
        assert (b"vary", b"Accept-Encoding") in headers
        assert (b"content-length", str(len(JSON)).encode()) in headers
        assert body(messages) == JSON


def test_untouched_when_not_eligible() -> None:
    start = json_headers(len(JSON), b"application/octet-stream")
    messages = run(scope(), start, [JSON])
    assert messages[0]["headers"] == start
    assert body(messages) == JSON
    partial = run(scope(), json_headers(10), [JSON[:10]], status=206)
    assert partial[0]["headers"] == json_headers(10)


def test_head_gets_the_headers_only() -> None:
    messages = run(scope("1.1", "HEAD"), json_headers(len(JSON)), [b""])
    assert (b"content-encoding", b"gzip") in messages[0]["headers"]
    assert body(messages) == b""


def test_streams_one_zlib_stream_without_buffering_the_body() -> None:
    pieces = [os.urandom(1 << 20) for _ in range(3)]  # incompressible: zlib cannot hold it back
    messages = run(scope(), json_headers(None), pieces)
    # Output left before the backend's last piece: the body is not gathered first.
    assert len(messages) >= 4 and all(m.get("more_body") for m in messages[1:-1])
    assert messages[-1].get("more_body") is False
    assert gzip.decompress(body(messages)) == b"".join(pieces)


def test_a_small_body_in_pieces_goes_out_as_one_chunk() -> None:
    """As nginx sends it (zlib would give its 10-byte header first): the same chunk framing,
    so the same $body_bytes_sent."""
    pieces = [JSON[:100], JSON[100:], b""]
    messages = run(scope(), json_headers(None), pieces)
    assert len(messages) == 2 and messages[1].get("more_body") is False
    assert gzip.decompress(body(messages)) == JSON


def through_the_edge(
    config: EdgeConfig, backend: ASGIApp, log: AccessLog, version: str
) -> list[Message]:
    """One GET of a bodiless request through the EdgeApp in-process; what it sent."""
    request = {
        **scope(version),
        "scheme": "http",
        "path": "/v2/x/manifests/y",
        "raw_path": b"/v2/x/manifests/y",
        "query_string": b"",
        "client": ("127.0.0.1", 1),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(EdgeApp(config, backend, log)(request, receive, send))
    log.close()
    return sent


@pytest.mark.parametrize("enabled", [True, False])
def test_the_edge_applies_it_when_enabled(enabled: bool, tmp_path: Path) -> None:
    """Whatever the backend (here an app in-process, as the embedded mirror is); the access
    log counts the bytes sent, compressed (then chunked: with the framing), as nginx's
    $body_bytes_sent does."""

    async def backend(_scope: Scope, _receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 404, "headers": json_headers(len(JSON))}
        )
        await send({"type": "http.response.body", "body": JSON})

    config = EdgeConfig(http="127.0.0.1:1", gzip={"enabled": enabled})
    log = AccessLog(str(tmp_path / "access.log"), "json")
    sent = through_the_edge(config, backend, log, "1.1")
    assert ((b"content-encoding", b"gzip") in sent[0]["headers"]) is enabled
    record = json.loads((tmp_path / "access.log").read_text())
    sent_body = body(sent)
    framing = len(b"%x\r\n\r\n0\r\n\r\n" % len(sent_body)) if enabled else 0
    assert record["body_bytes_sent"] == len(sent_body) + framing
    assert (len(body(sent)) < len(JSON)) is enabled


@pytest.mark.parametrize(("version", "framing"), [("1.1", True), ("1.0", False)])
def test_an_unsized_answer_is_counted_as_framed(
    version: str, framing: bool, tmp_path: Path
) -> None:
    """$body_bytes_sent counts the chunk framing of an answer without a length, but not to
    HTTP/1.0, which gets it unframed (the connection's end ends it)."""
    pieces = [b"a" * 1000, b"b" * 500]

    async def backend(_scope: Scope, _receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    config = EdgeConfig(http="127.0.0.1:1", gzip={"enabled": False})
    log = AccessLog(str(tmp_path / "access.log"), "json")
    through_the_edge(config, backend, log, version)
    sent = json.loads((tmp_path / "access.log").read_text())["body_bytes_sent"]
    framed = len(b"3e8\r\n\r\n") + len(b"1f4\r\n\r\n") + len(b"0\r\n\r\n")
    assert sent == 1500 + (framed if framing else 0)

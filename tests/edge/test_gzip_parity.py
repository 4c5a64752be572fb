"""gzip parity: the same requests to nginx (the seed's gzip block) and to edgeproxy (points-to
backend, `[edge.gzip] enabled`), both in front of one backend answering like a registry; the
gzip decision (status, Content-Encoding, Vary, ETag, Content-Length) and the decoded body must
be the same."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from starlette.types import Receive, Scope, Send

from tests.support.edge import ProxyEdge, serve_edge_app
from tests.support.nginx import run_nginx
from tests.support.rawhttp import Answer, exchange
from tests.support.servers import serve_app

pytestmark = pytest.mark.e2e

ERROR = (
    b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":'
    b'{"Tag":"' + b"v" * 200 + b'"}}]}\n'
)
SMALL = b'{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known"}]}\n'
CATALOG = b'{"repositories":[' + b",".join(b'"library/r%d"' % i for i in range(40)) + b"]}\n"


async def registry_like(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers by path, as a registry would: JSON errors, a catalog, a blob, a manifest."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    path: str = scope["path"]
    status, kind, body = 200, b"application/json; charset=utf-8", CATALOG
    extra: list[tuple[bytes, bytes]] = []
    length = True
    if path == "/error":
        status, body = 404, ERROR
    elif path == "/denied":
        status, body = 401, ERROR
    elif path == "/small":
        status, body = 404, SMALL
    elif path == "/blob":
        kind, body = b"application/octet-stream", ERROR * 4
        if (b"range", b"bytes=0-9") in scope["headers"]:
            status, body = 206, body[:10]
            extra = [(b"content-range", b"bytes 0-9/%d" % (len(ERROR) * 4))]
    elif path == "/manifest":
        kind = b"application/vnd.docker.distribution.manifest.v2+json"
        extra = [(b"etag", b'"sha256:abc"')]
    elif path == "/encoded":
        extra = [(b"content-encoding", b"br")]
    elif path == "/etag":
        extra = [(b"etag", b'"sha256:abc"'), (b"accept-ranges", b"bytes")]
    elif path == "/accel":  # what nginx acts on and hides (proxy_hide_header's defaults)
        extra = [(b"x-accel-" + name, value) for name, value in ACCEL] + [(b"x-pad", b"1")]
    elif path.startswith("/type/"):  # nginx reads a type up to `;` only before a charset
        kind = {
            "param": b"application/json; foo=bar",
            "charset": b"application/json; charset=utf-8",
            "param and charset": b"application/json; foo=bar; charset=utf-8",
            "charset and param": b"application/json;  Charset=utf-8; foo=bar",
            "bare semicolon": b"application/json;",
        }[unquote(path[6:])]
    elif path == "/chunked":
        body, length = SMALL, False  # under 256 B, but the length is not known up front
    headers = [(b"content-type", kind), *extra]
    if length:
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def request(
    path: str,
    *headers: str,
    method: str = "GET",
    version: str = "1.1",
    accept: str = "gzip, deflate",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: mirror.example.com", "Connection: close"]
    if accept:
        lines.append(f"Accept-Encoding: {accept}")
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode()


# Values that change nothing here (X-Accel-Redirect would redirect nginx inside itself).
ACCEL = [(b"expires", b"0"), (b"limit-rate", b"0"), (b"buffering", b"yes"), (b"charset", b"off")]


ACCEPT = [
    *("gzip;q=" + q for q in ("0.001", "0.0001", ".5", "1.5", "1.0", "1.000", "1.0000", "0.")),
    *("gzip;q=0.5;x=1", "gzip;level=1", "gzip;q =1", "gzip; q=0.5", "gzip ;q=0", "GZIP;Q=1"),
    *("gzipx, gzip", "x-gzip, gzip", "gzip\t", "br, gzip", "gzip;", "gzip;q="),
]
MSIE6 = "User-Agent: Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1)"
CASES = {
    "json error >= 256 B": request("/error"),
    "catalog json 200": request("/v2/_catalog"),
    "json 401": request("/denied"),
    "json under 256 B": request("/small"),
    "chunked json, length unknown": request("/chunked"),
    "octet-stream blob": request("/blob"),
    "manifest type": request("/manifest"),
    "already encoded": request("/encoded"),
    "strong etag, accept-ranges": request("/etag"),
    "msie 6": request("/error", MSIE6),
    "msie 6 sv1": request("/error", "User-Agent: Mozilla/4.0 (compatible; MSIE 6.0; SV1)"),
    "range answered 206": request("/blob", "Range: bytes=0-9"),
    "range answered 200": request("/error", "Range: bytes=0-9"),
    "http/1.0": request("/error", version="1.0"),
    "no accept-encoding": request("/error", accept=""),
    "gzip;q=0": request("/error", accept="gzip;q=0"),
    "head": request("/error", method="HEAD"),
    # Accept-Encoding as nginx 1.22 parses it, and only the first one (the first User-Agent). Not
    # "\tgzip": llhttp drops the tab before a value, nginx does not (and so refuses it).
    **{f"accept {value!r}": request("/error", accept=value) for value in ACCEPT},
    "two accept-encodings": request("/error", "Accept-Encoding: gzip", accept="identity"),
    "two user-agents": request("/error", "User-Agent: x", MSIE6),
    "type with a parameter": request("/type/param"),
    "type with a charset": request("/type/charset"),
    "type with a parameter, then a charset": request("/type/param%20and%20charset"),
    "type with a charset, then a parameter": request("/type/charset%20and%20param"),
    "type and a bare semicolon": request("/type/bare%20semicolon"),
}


def decision(answer: Answer) -> dict[str, object]:
    body = answer.body
    if answer.header("content-encoding") == "gzip" and body:
        body = gzip.decompress(body)
    return {
        "status": answer.status,
        "content-encoding": answer.header("content-encoding"),
        "vary": answer.values("vary"),
        "etag": answer.header("etag"),
        "accept-ranges": answer.header("accept-ranges"),
        "content-length": answer.header("content-length"),
        "body": body,
    }


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    prefix = tmp_path_factory.mktemp("nginx")
    with (
        serve_app(registry_like) as backend,
        run_nginx(Path(prefix), backend) as nginx_port,
        serve_edge_app(ProxyEdge(backend, gzip={"enabled": True})) as edge_url,
    ):
        yield nginx_port, int(edge_url.rsplit(":", 1)[1])


@pytest.mark.parametrize("case", list(CASES))
def test_gzip_decision_as_nginx(case: str, ports: tuple[int, int]) -> None:
    nginx_port, edge_port = ports
    theirs = decision(exchange(nginx_port, CASES[case]))
    ours = decision(exchange(edge_port, CASES[case]))
    assert ours == theirs


def test_the_cases_cover_both_decisions(ports: tuple[int, int]) -> None:
    nginx_port, _ = ports
    encodings = [exchange(nginx_port, r).header("content-encoding") for r in CASES.values()]
    assert "gzip" in encodings and None in encodings


def test_hidden_backend_headers_as_nginx(ports: tuple[int, int]) -> None:
    """nginx hides the backend's X-Accel-* and X-Pad from the client."""
    names = [
        sorted(
            name for name, _ in exchange(port, request("/accel")).headers if name.startswith("x-")
        )
        for port in ports
    ]
    assert names[1] == names[0] == []

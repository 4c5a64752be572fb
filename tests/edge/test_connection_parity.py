"""Connection-level behaviour against nginx as the oracle, over raw sockets: malformed request
lines and heads, plain HTTP on the TLS port, slow heads (client_header_timeout), the keepalive
idle close, lingering close after a refusal, a chunked body over the limit to the embedded
mirror. Each compares nginx (the seed's config, 1 s header and keepalive timeouts, a 1m body
limit) with an `edgeproxy run` configured alike, both in front of the same backend; the
access log lines are compared field for field (but the time, the request time and the page
size: the pages say edgeproxy where nginx's say nginx)."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.types import Receive, Scope, Send

from tests.edge.test_limits_parity import Counter, chunked, get
from tests.support.edge import make_certificate, run_edge
from tests.support.nginx import run_nginx
from tests.support.rawhttp import Answer, exchange, parse
from tests.support.servers import serve_app
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

TIMEOUTS = {
    "client_header_timeout": "1s",
    "client_body_timeout": "1s",
    "keepalive_timeout": "1s",
    "send_timeout": "1s",
}
NGINX_TIMEOUTS = "client_header_timeout 1s; client_body_timeout 1s; send_timeout 1s;"
BIG = 64 << 20  # the size of /big's answer: more than the sockets' buffers hold
OFFLINE = [{"name": "docker.io", "url": "http://127.0.0.1:9"}]


@dataclass
class Server:
    """One side: its plain port, its TLS port, its access log."""

    name: str
    port: int
    tls_port: int
    log: Path
    certificate: Path

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


class Backend(Counter):
    """The Counter, and /big: BIG bytes."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/big":
            await super().__call__(scope, receive, send)
            return
        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % BIG)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        piece = b"x" * (1 << 20)
        for left in range(BIG, 0, -len(piece)):
            more = left > len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": more})


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    work = Path(tmp_path_factory.mktemp("connection"))
    certificate, key = make_certificate(work / "certs", "127.0.0.1")
    with ExitStack() as stack:
        backend = stack.enter_context(serve_app(Backend()))
        nginx = {}
        for kind, tls in (("plain", None), ("tls", (certificate, key))):
            nginx[kind] = stack.enter_context(
                run_nginx(
                    work / f"nginx-{kind}",
                    backend,
                    client_max_body_size="1m",
                    tls=tls,
                    keepalive_timeout="1",
                    access_log=work / "nginx.log",
                    directives=NGINX_TIMEOUTS,
                )
            )
        edges = {
            tls: stack.enter_context(
                run_edge(
                    work / f"edge-{tls}",
                    OFFLINE,
                    tls=tls,
                    backend=backend,
                    client_max_body_size="1m",
                    workers=1,
                    access_log=str(work / "edge.log"),  # both edges, one log
                    **TIMEOUTS,
                )
            )
            for tls in (False, True)
        }
        https = edges[True]
        assert https.https_port is not None and https.certificate is not None
        yield (
            Server("nginx", nginx["plain"], nginx["tls"], work / "nginx.log", certificate),
            Server(
                "edge",
                edges[False].http_port,
                https.https_port,
                work / "edge.log",
                https.certificate,
            ),
        )


def fields(line: str) -> str:
    """A log line without what differs by nature: the time, the request time, the page size."""
    line = re.sub(r"\[[^]]+\]", "[time]", line)
    line = re.sub(r' (\d{3}) \d+ "', r' \1 size "', line)
    return re.sub(r" [0-9.]+ $", " time ", line)


def logged(server: Server, before: int) -> str:
    """The line logged after `before` lines (each request here writes one)."""
    assert wait_until(lambda: len(server.lines()) > before, timeout=10), server.name
    return server.lines()[before]


def outcome(answer: Answer) -> tuple[int, str]:
    title = re.search(rb"<title>(.*)</title>", answer.body)
    return answer.status, (title.group(1) if title else answer.body).decode()


MALFORMED: dict[str, bytes] = {
    "garbage": b"\x00\x01garbage\r\n\r\n",
    "lowercase method": b"get / HTTP/1.1\r\nHost: x\r\n\r\n",
    "tab for a space": b"GET\t/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "no URI": b"GET HTTP/1.1\r\nHost: x\r\n\r\n",
    "URI without a slash": b"GET abc HTTP/1.1\r\nHost: x\r\n\r\n",
    "space in the URI": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in the URI": b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n",
    "control byte in the URI": b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
    "DEL in the URI": b"GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n",
    "method with a dash": b"M-SEARCH / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "two spaces before the version": b"GET /  HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "spaces after the version": b"GET / HTTP/1.1  \r\nHost: x\r\nConnection: close\r\n\r\n",
    "NUL in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bad version": b"GET / HTTP/1.x\r\nHost: x\r\n\r\n",
    "HTTP/0.9 named": b"GET / HTTP/0.9\r\nHost: x\r\n\r\n",
    "HTTP/2.0": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    "HTTP/10.0": b"GET / HTTP/10.0\r\nHost: x\r\n\r\n",
    "HTTP/1.2": b"GET / HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n",
    "CR without LF": b"GET / HTTP/1.1\rHost: x\r\r",
    "bare LF": b"GET / HTTP/1.1\nHost: x\nConnection: close\n\n",
    "blank lines first": b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "absolute URI": b"GET http://y/z?q HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "HTTP/1.1 without Host": b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    "two Hosts": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "space in a header name": b"GET / HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
    "path above the root": b"GET /../x HTTP/1.1\r\nHost: x\r\n\r\n",
    "escaped path above the root": b"GET /a/%2e%2e/../x HTTP/1.1\r\nHost: x\r\n\r\n",
    "dots in a name": b"GET /a..b/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "Transfer-Encoding: Chunked": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n"
        b"Connection: close\r\n\r\n0\r\n\r\n"  # an empty body: logged ""
    ),
    "empty body by length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "bad Content-Length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "Content-Length and chunked": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "unknown Transfer-Encoding": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "HTTP/1.0 chunked": (
        b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "TRACE": b"TRACE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "CONNECT": b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    "CONNECT to a path": b"CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/1.0 gzip-encoded": b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "TRACE above the root": b"TRACE /../x HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute URI above the root": b"GET http://y/../x HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute URI with a query only": (
        b"GET http://y?q HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ),
    "slash in Host": b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "empty Host": b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
    "empty Host HTTP/1.0": b"GET / HTTP/1.0\r\nHost: \r\n\r\n",
    "backslash in Host": b"GET / HTTP/1.1\r\nHost: a\\b\r\n\r\n",
    "Host with dots": b"GET / HTTP/1.1\r\nHost: ..\r\n\r\n",
    "Host with a port": b"GET / HTTP/1.1\r\nHost: x:80\r\nConnection: close\r\n\r\n",
    "Host bracketed": b"GET / HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n",
    "Host trailing dot": b"GET / HTTP/1.1\r\nHost: X.\r\nConnection: close\r\n\r\n",
    "Host with space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "Host with control": b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n",
    "absolute URI without a path": b"GET http://y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "absolute URI bad host": b"GET http://a b/ HTTP/1.1\r\nHost: x\r\n\r\n",
    "two Transfer-Encodings": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "Transfer-Encoding with tabs": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\t\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "space after a chunk size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"\r\n3 \r\nabc\r\n0\r\n\r\n"
    ),
    "bad chunk size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    ),
    "chunk without its CRLF": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n"
    ),
    "trailers": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"\r\n3\r\nabc\r\n0\r\nHost: evil\r\nX-Trailer: 1\r\n\r\n"
    ),
    "1000 header lines": get(1, (1,) * 998),
    "1001 header lines": get(1, (1,) * 999),
    "absolute URI with .. in its host": (
        b"GET http://a..b/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ),
    "HTTP/1.2 chunked": (
        b"POST / HTTP/1.2\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "request line over 32k (414)": get(40000),
    "header over 32k (400)": get(1, (40000,)),
    "head over the buffers (400)": get(1, (20000,) * 7),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_as_nginx(case: str, sides: tuple[Server, Server]) -> None:
    results = []
    for server in sides:
        before = len(server.lines())
        answer = exchange(server.port, MALFORMED[case])
        line = logged(server, before)
        assert f" {answer.status} {len(answer.body)} " in line, (server.name, line)
        results.append((outcome(answer), fields(line)))
        assert exchange(server.port, get()).status == 200  # and it serves the next client
        logged(server, before + 1)  # its line may follow its answer: in before the next case
    assert results[1] == results[0]


@pytest.mark.parametrize("first", [b"GET / HTTP/1.1\r", b"GET / HTTP/1.1 \r", b"GET / HTTP/1.1"])
def test_a_request_line_whose_end_comes_in_the_next_read(
    first: bytes, sides: tuple[Server, Server]
) -> None:
    """The line's CR (or spaces) in one segment, its LF in the next: as nginx, a request
    (it was a 400: the line had gone to llhttp before its end was known)."""
    rest = (b"\n" if first.endswith(b"\r") else b"\r\n") + b"Host: x\r\nConnection: close\r\n\r\n"
    statuses = []
    for server in sides:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            conn.sendall(first)
            time.sleep(0.2)  # two segments, most likely; either way the answer must be 200
            conn.sendall(rest)
            statuses.append(conn.recv(12))
    assert statuses == [b"HTTP/1.1 200"] * 2


def test_the_malformed_cases_cover_each_answer(sides: tuple[Server, Server]) -> None:
    nginx, _ = sides
    before = len(nginx.lines())
    statuses = {exchange(nginx.port, request).status for request in MALFORMED.values()}
    assert statuses == {200, 400, 405, 414, 501, 505}
    # A line is written when a lingering close ends: let none come late into another test.
    assert wait_until(lambda: len(nginx.lines()) == before + len(MALFORMED))


def test_plain_http_to_the_tls_port_as_nginx(sides: tuple[Server, Server]) -> None:
    results = []
    for server in sides:
        before = len(server.lines())
        answer = exchange(server.tls_port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nUser-Agent: u\r\n\r\n")
        line = logged(server, before)
        results.append((outcome(answer), answer.header("connection"), fields(line)))
        assert tls_get(server) == 200  # TLS on that port still works
    assert results[0][0] == (400, "400 The plain HTTP request was sent to HTTPS port")
    assert results[1] == results[0]


def tls_get(server: Server) -> int:
    context = ssl.create_default_context(cafile=server.certificate)
    with (
        socket.create_connection(("127.0.0.1", server.tls_port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        conn.sendall(get())
        data = b""
        with suppress(ssl.SSLError):
            while chunk := conn.recv(65536):
                data += chunk
    return parse(data).status


def test_a_chunk_breaking_once_the_body_began_as_nginx(sides: tuple[Server, Server]) -> None:
    """Part of the body is at the backend when a bad chunk size comes: nginx's 400 page, one
    log line, with the body so far."""
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    results = []
    for server in sides:
        before = len(server.lines())
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            conn.sendall(head)
            time.sleep(0.3)  # two segments, most likely; either way the same answer
            conn.sendall(b"zz\r\nabc\r\n0\r\n\r\n")
            answer = parse(read_all(conn))
        line = logged(server, before)
        assert exchange(server.port, get()).status == 200
        # The GET's line may follow its answer: wait for it, then no second line of the POST
        # came between them.
        assert '"GET / HTTP/1.1"' in logged(server, before + 1)
        results.append((outcome(answer), fields(line)))
    assert results[1] == results[0]
    assert " abc 400 size " in results[0][1]


class SlowBackend:
    """Answers after 2 s: a request pipelined behind one comes before its answer, and its
    head is older than the 1 s client_header_timeout by then."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await asyncio.sleep(2)
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"slow"})


def test_a_bad_request_pipelined_behind_a_good_one_as_nginx(tmp_path: Path) -> None:
    """Each is answered, in order: the bad one's 400 took the place of the good one's answer
    (edgeproxy answered 400 and never logged the good one); and the bad one waits for it
    without a client_header_timeout (which closed the connection before either answer)."""
    with ExitStack() as stack:
        backend = stack.enter_context(serve_app(SlowBackend()))
        nginx_log, edge_log = tmp_path / "nginx.log", tmp_path / "edge.log"
        nginx = stack.enter_context(
            run_nginx(tmp_path / "nginx", backend, access_log=nginx_log, directives=NGINX_TIMEOUTS)
        )
        edge = stack.enter_context(
            run_edge(
                tmp_path / "edge",
                OFFLINE,
                tls=False,
                backend=backend,
                access_log=str(edge_log),
                **TIMEOUTS,
            )
        )
        results = []
        for port, log in ((nginx, nginx_log), (edge.http_port, edge_log)):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.3)  # its own segment, most likely; either way the same answers
                conn.sendall(b"get /two HTTP/1.1\r\nHost: x\r\n\r\n")
                answers = read_all(conn)
            assert wait_until(lambda: len(log.read_text().splitlines()) == 2)  # noqa: B023
            statuses = re.findall(rb"HTTP/1.1 (\d{3})", answers)
            # The two lines in either order: the bad one's may be written first.
            results.append((statuses, sorted(map(fields, log.read_text().splitlines()))))
    assert results[1] == results[0]
    assert results[0][0] == [b"200", b"400"]


@pytest.mark.parametrize("offered", [["h2", "http/1.1"], ["http/1.1"], ["h2"]])
def test_alpn_as_nginx(offered: list[str], sides: tuple[Server, Server]) -> None:
    """The seed's nginx (no http2) picks http/1.1 when a client offers it (curl, Go's clients)."""
    selected = []
    for server in sides:
        context = ssl.create_default_context(cafile=server.certificate)
        context.set_alpn_protocols(offered)
        try:
            with (
                socket.create_connection(("127.0.0.1", server.tls_port), timeout=30) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
            ):
                selected.append(conn.selected_alpn_protocol())
        except ssl.SSLError as exc:
            selected.append(exc.reason)  # no protocol both take: a refused handshake
    assert selected[1] == selected[0]


def stalled(port: int, sent: bytes) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(sent)
    return conn


def read_all(conn: socket.socket) -> bytes:
    """What the server sends until it closes (a reset counts as a close)."""
    data = b""
    with suppress(ConnectionResetError):
        while chunk := conn.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    "sent",
    [b"GET /slow HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n", b"GET /sl", b""],
    ids=["headers", "request line", "nothing"],
)
def test_a_slow_head_is_closed_as_nginx(sent: bytes, sides: tuple[Server, Server]) -> None:
    results = []
    for server in sides:
        before = len(server.lines())
        with closing(stalled(server.port, sent)) as slow:
            # Served meanwhile, on another connection.
            assert exchange(server.port, get()).status == 200
            assert read_all(slow) == b""  # closed after client_header_timeout, no answer
        line = logged(server, before)  # the GET's
        if sent:  # the 408's line may follow the close
            logged(server, before + 1)
        after = server.lines()[before + 1 :]
        results.append((fields(line), [fields(extra) for extra in after]))
    assert results[1] == results[0]
    assert len(results[0][1]) == (1 if sent else 0)  # 408, if a request had begun


def test_the_slow_head_is_logged_408(sides: tuple[Server, Server]) -> None:
    _, edge = sides
    before = len(edge.lines())
    with closing(stalled(edge.port, b"GET /slow HTTP/1.1\r\nHost: x\r\n")) as slow:
        assert read_all(slow) == b""
    assert ' "GET /slow HTTP/1.1" - - 408 0 ' in logged(edge, before)


@pytest.mark.parametrize(
    "sent",
    [
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n",
    ],
    ids=["length", "chunked"],
)
def test_a_slow_body_is_closed_as_nginx(sent: bytes, sides: tuple[Server, Server]) -> None:
    results = []
    for server in sides:
        before = len(server.lines())
        with closing(stalled(server.port, sent)) as slow:
            assert exchange(server.port, get()).status == 200  # served meanwhile
            assert read_all(slow) == b""  # closed after client_body_timeout, no answer
        assert wait_until(lambda: len(server.lines()) == before + 2, timeout=10)  # noqa: B023
        results.append(sorted(fields(line) for line in server.lines()[before:]))
    assert results[1] == results[0]
    assert " 408 size " in "".join(results[0])


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
def test_a_client_that_stops_reading_is_cut_as_nginx(
    secure: bool, sides: tuple[Server, Server]
) -> None:
    """send_timeout: a client that takes nothing of an answer for that long is cut, and the
    request logged (as answered: its status, what was sent)."""
    results = []
    for server in sides:
        before = len(server.lines())
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        raw.settimeout(30)
        raw.connect(("127.0.0.1", server.tls_port if secure else server.port))
        conn = raw
        if secure:
            context = ssl.create_default_context(cafile=server.certificate)
            conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
        with closing(conn):
            conn.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            first = conn.recv(1 << 16)
            assert first.startswith(b"HTTP/1.1 200 OK\r\n")
            # Then nothing read: the line is written once the connection was cut.
            assert wait_until(lambda: len(server.lines()) > before, timeout=30)  # noqa: B023
            with suppress(ssl.SSLError):  # cut without a close_notify
                got = len(first) + len(read_all(conn))
        assert got < BIG, server.name  # what the kernels held, not the answer
        # Without the TLS version and cipher: nginx 1.22 leaves TLS 1.3 out by default.
        results.append(re.sub(r" TLSv\S+ \S+ time $", " time ", fields(server.lines()[before])))
    assert results[1] == results[0]


def test_a_100_continue_is_counted_as_nginx(sides: tuple[Server, Server]) -> None:
    """Both answer "100 Continue" before reading the body, and count it in $body_bytes_sent."""
    request = b"POST /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n"
    results = []
    for server in sides:
        before = len(server.lines())
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            conn.sendall(request + b"Connection: close\r\n\r\n")
            assert conn.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
            conn.sendall(b"abc")
            assert parse(read_all(conn)).body == b"got 3"
        line = logged(server, before)
        results.append(re.sub(r" [0-9.]+ $", " time ", re.sub(r"\[[^]]+\]", "[time]", line)))
    assert results[1] == results[0]
    assert " abc 200 30 " in results[0]  # 25 + 5


def test_an_idle_keepalive_connection_is_closed_as_nginx(sides: tuple[Server, Server]) -> None:
    for server in sides:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            for _ in range(2):  # kept alive between the two, then closed when idle
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                head = b""
                while b"got 0" not in head:
                    chunk = conn.recv(65536)
                    assert chunk, f"{server.name} closed a kept-alive connection early"
                    head += chunk
                assert head.startswith(b"HTTP/1.1 200 ")
            assert read_all(conn) == b"", server.name  # closed by keepalive_timeout


def answers_on_one_connection(port: int, request: bytes) -> list[bytes | None]:
    """Send `request` twice on one connection, the second after the first answer ("got N",
    framed by its length): each answer's head, None for one never given (the server closed)."""
    heads: list[bytes | None] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        for _ in range(2):
            with suppress(BrokenPipeError, ConnectionResetError):
                conn.sendall(request)
            received = b""
            with suppress(ConnectionResetError):
                while not re.search(rb"\r\n\r\ngot \d+", received):
                    if not (chunk := conn.recv(65536)):
                        break
                    received += chunk
            heads.append(received.partition(b"\r\n\r\n")[0] or None)
    return heads


@pytest.mark.parametrize(
    "connection",
    # nginx finds "keep-alive" anywhere in the value; llhttp (and so edgeproxy) as a token.
    [b"keep-alive", b"Keep-Alive", b"close", b"", b"keep-alive, close", b"TE, keep-alive"],
)
def test_http10_keep_alive_as_nginx(connection: bytes, sides: tuple[Server, Server]) -> None:
    """An HTTP/1.0 client asking for keep-alive (ab -k, old proxies) has its connection kept,
    and is told so: a 1.0 client takes a connection to close unless the answer says so."""
    field = b"Connection: " + connection + b"\r\n" if connection else b""
    request = b"GET / HTTP/1.0\r\nHost: x\r\n" + field + b"\r\n"
    results = []
    for server in sides:
        results.append(
            [
                head and [line.lower() for line in head.split(b"\r\n") if b"onnection" in line]
                for head in answers_on_one_connection(server.port, request)
            ]
        )
    assert results[1] == results[0]


@pytest.mark.parametrize(
    "head",
    [
        b"PUT /cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
        b"PATCH /cut HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
    ],
)
def test_a_client_gone_in_the_middle_of_its_body_is_logged_400(
    sides: tuple[Server, Server], head: bytes
) -> None:
    """A push cut mid-body: nginx logs 400 ("client prematurely closed connection while
    reading client request body"), not the 499 of a client gone while it waited."""
    results = []
    for server in sides:
        before = len(server.lines())
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            conn.sendall(head)
            time.sleep(0.2)  # the head is in before the close (either order logs the same)
        results.append(fields(logged(server, before)))
    assert results[1] == results[0]
    assert " 0123456789 400 size " in results[0]


def test_keepalive_timeout_0_closes_after_each_answer_as_nginx(tmp_path: Path) -> None:
    """nginx's `keepalive_timeout 0` turns keep-alive off: each answer says Connection: close
    and the connection closes."""
    with ExitStack() as stack:
        backend = stack.enter_context(serve_app(Counter()))
        nginx = stack.enter_context(run_nginx(tmp_path / "nginx", backend, keepalive_timeout="0"))
        edge = stack.enter_context(
            run_edge(tmp_path / "edge", OFFLINE, tls=False, backend=backend, keepalive_timeout=0)
        )
        for port in (nginx, edge.http_port):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = parse(read_all(conn))  # all of it: the server closed
            assert (answer.status, answer.header("connection")) == (200, "close"), port


def test_a_refused_body_is_read_on_so_the_client_gets_the_answer(
    sides: tuple[Server, Server],
) -> None:
    """Lingering close: the client sends its 8 MiB body after the 413 is on its way; the server
    reads and drops it instead of resetting, so the client still reads the whole page."""
    body = b"z" * (8 << 20)
    results = []
    for server in sides:
        head = b"PUT /v2/x/blobs/uploads/1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            conn.sendall(head % len(body))
            first = conn.recv(65536)  # the 413's start: it answered before any body
            assert first.startswith(b"HTTP/1.1 413 "), server.name
            conn.sendall(body)  # a reset would fail this
            answer = parse(first + read_all(conn))
        results.append(outcome(answer))
    assert results[0] == results[1] == (413, "413 Request Entity Too Large")


def test_many_stalled_connections_do_not_starve_others(tmp_path: Path) -> None:
    """300 connections stalled (the default 60 s client_header_timeout keeps them open
    throughout): in a head, before a first byte on the TLS port, in a TLS handshake; real
    clients, plain and TLS, are served meanwhile."""
    with run_edge(tmp_path, OFFLINE, workers=1, server_name="") as edge:
        assert edge.https_port is not None and edge.certificate is not None
        https = Server("edge", edge.http_port, edge.https_port, edge.access_log, edge.certificate)
        answers = (exchange(edge.http_port, get()).status, tls_get(https))
        with ExitStack() as stack:
            kinds = [
                (edge.http_port, b"GET / HTTP/1.1\r\nHost:"),
                (edge.https_port, b""),
                (edge.https_port, b"\x16\x03\x01\x02\x00\x01"),  # a ClientHello begun
            ]
            stalled_ones = [
                stack.enter_context(closing(stalled(port, sent))) for port, sent in kinds * 100
            ]
            for _ in range(20):
                assert (exchange(edge.http_port, get()).status, tls_get(https)) == answers
            for conn in stalled_ones:  # they were stalled all along: open, unanswered
                conn.setblocking(False)
                with pytest.raises(BlockingIOError):
                    conn.recv(1)


def test_chunked_body_over_the_limit_to_the_embedded_mirror(
    tmp_path: Path, sides: tuple[Server, Server]
) -> None:
    """nginx reads a chunked body before it answers (413 once over the limit); the embedded
    mirror answers every write 405 without reading: the edge reads it first, as nginx."""
    nginx, _ = sides
    upload = b"PATCH /v2/x/blobs/uploads/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    upload += b"Connection: close\r\n\r\n"
    with run_edge(tmp_path, OFFLINE, tls=False, client_max_body_size="1m", workers=1) as edge:
        ours = exchange(edge.http_port, upload, body=chunked(3 << 20))
        under = exchange(edge.http_port, upload, body=chunked(1 << 19))
    theirs = exchange(nginx.port, upload, body=chunked(3 << 20))
    assert outcome(ours) == outcome(theirs) == (413, "413 Request Entity Too Large")
    assert under.status == 405  # under the limit: the mirror's answer to a write
    with run_edge(tmp_path, OFFLINE, tls=False, client_max_body_size="1m", workers=1) as edge:
        ours_early = answer_before_the_body_ends(edge.http_port, upload)
    assert ours_early == answer_before_the_body_ends(nginx.port, upload) == b"HTTP/1.1 413 "


def answer_before_the_body_ends(port: int, upload: bytes) -> bytes:
    """Send 2 MiB of a chunked body, small pieces, and never its end: nginx answers 413 as
    the limit is crossed. The edge did only once the body ended, each piece past the limit
    a deeper recursion (a RecursionError, so a 500, after a few hundred)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(30)
        conn.sendall(upload + chunked(2 << 20, piece=1024)[: -len(b"0\r\n\r\n")])
        return conn.recv(13)

"""The access log line against nginx's: the same odd request to nginx (the seed's `main`
format) and to edgeproxy, both in front of one backend (the `sides` of
test_connection_parity); the lines must be the same but for the time and request time."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from starlette.types import Receive, Scope, Send

from tests.edge.test_connection_parity import OFFLINE, Server, fields, logged, sides
from tests.mirror.fake_upstream import fake_upstream
from tests.support.edge import run_edge
from tests.support.nginx import run_nginx
from tests.support.rawhttp import exchange
from tests.support.servers import serve_app
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

__all__ = ["sides"]  # the fixture, shared with test_connection_parity


def request(*headers: bytes, line: bytes = b"GET / HTTP/1.1") -> bytes:
    return b"\r\n".join([line, b"Host: x", *headers, b"Connection: close"]) + b"\r\n\r\n"


CASES: dict[str, bytes] = {
    "non-ASCII User-Agent and Referer": request(
        b"User-Agent: caf\xc3\xa9 \x80\t.", b"Referer: http://r/\xff"
    ),
    "non-ASCII user": request(b"Authorization: Basic w6k6cA=="),  # "é:p"
    # $remote_user as nginx decodes Basic credentials: padding optional, nothing read past a
    # "=", a user only before a ":".
    "Basic without padding": request(b"Authorization: Basic dTp"),  # "u:"
    "Basic past its padding": request(b"Authorization: Basic dTpw=zz"),  # "u:p"
    "Basic without a colon": request(b"Authorization: Basic dQ=="),  # "u"
    "Basic with a bad length": request(b"Authorization: Basic dTpwe"),
    # nginx drops the spaces after a value (not tabs); llhttp kept them.
    "spaces after values": request(b"User-Agent: u \t  ", b"Authorization: Basic dTpw  "),
    # Sent empty: nginx prints the empty value, "-" only for a header not sent.
    "empty User-Agent and X-Forwarded-For": request(b"User-Agent: ", b"X-Forwarded-For:"),
    # nginx joins every X-Forwarded-For line; of the other headers it takes the first.
    "two of each": request(
        *(b"X-Forwarded-For: 192.0.2.%d" % i for i in (1, 2)),
        *(b"User-Agent: u%d" % i for i in (1, 2)),
        *(b"Referer: r%d" % i for i in (1, 2)),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logged_as_nginx(case: str, sides: tuple[Server, Server]) -> None:
    lines = []
    for server in sides:
        before = len(server.lines())
        assert exchange(server.port, CASES[case]).status == 200
        lines.append(fields(logged(server, before)))
    assert lines[1] == lines[0]


class Held:
    """A backend that answers nothing until the proxy closes the connection (or, failing
    that, after RELEASE seconds, with a 200)."""

    RELEASE = 5.0

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.cut = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (message := await receive()).get("more_body"):
            pass
        self.arrived.set()
        try:
            message = await asyncio.wait_for(receive(), self.RELEASE)
        except TimeoutError:
            start = {"type": "http.response.start", "status": 200}
            await send({**start, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        if message["type"] == "http.disconnect":
            self.cut.set()


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Held, list[Server]]]:
    work = Path(tmp_path_factory.mktemp("held"))
    backend = Held()
    with ExitStack() as stack:
        url = stack.enter_context(serve_app(backend))
        nginx_log, edge_log = work / "nginx.log", work / "edge.log"
        nginx = stack.enter_context(run_nginx(work / "nginx", url, access_log=nginx_log))
        edge = stack.enter_context(
            run_edge(work / "edge", OFFLINE, tls=False, backend=url, access_log=str(edge_log))
        )
        yield (
            backend,
            [
                Server("nginx", nginx, 0, nginx_log, Path()),
                Server("edge", edge.http_port, 0, edge_log, Path()),
            ],
        )


@pytest.mark.parametrize("half", [False, True], ids=["close", "half-close"])
@pytest.mark.parametrize(
    "sent",
    [
        b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /held HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    ],
    ids=["GET", "PUT"],
)
def test_a_client_gone_before_the_answer_is_logged_499(
    sent: bytes, half: bool, held: tuple[Held, list[Server]]
) -> None:
    """nginx notices a client leaving (or half-closing) while the backend has not answered:
    it closes the backend's connection and logs 499 with nothing sent (edgeproxy waited for
    the answer and logged it as sent: 200 2)."""
    backend, servers = held
    lines, cuts = [], []
    for server in servers:
        backend.arrived.clear()
        backend.cut.clear()
        before = len(server.lines())
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
            conn.sendall(sent)
            assert backend.arrived.wait(10), server.name
            if half:
                conn.shutdown(socket.SHUT_WR)
            else:
                conn.close()
            lines.append(fields(logged(server, before)))
        cuts.append(backend.cut.wait(10))  # the backend's connection closed
    assert lines[1] == lines[0]
    assert " 499 size " in lines[0]
    assert cuts == [True, True]


def test_a_client_gone_before_the_embedded_mirror_answers_is_logged_499(
    tmp_path: Path,
) -> None:
    """The same in front of the embedded mirror, while its upstream sends a head that never
    ends: 499 at once (it was logged when the mirror gave up on the upstream, with its 503)."""
    with fake_upstream() as upstream:
        upstream.faults["/manifests/v1"] = "trickle"
        entry = {"name": "docker.io", "url": upstream.url, "read_timeout": "2s"}
        with run_edge(tmp_path, [entry], tls=False, workers=1) as edge:
            with socket.create_connection(("127.0.0.1", edge.http_port), timeout=30) as conn:
                conn.sendall(b"GET /v2/library/x/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n")
                assert wait_until(lambda: any("/manifests/v1" in k for k in upstream.requests))
            assert wait_until(lambda: edge.access_lines() != [], timeout=10)
            assert ' "GET /v2/library/x/manifests/v1 HTTP/1.1" - - 499 0 ' in edge.access_lines()[0]

"""The access log line against nginx's: the same odd request to nginx (the seed's `main`
format) and to edgeproxy, both in front of one backend (the `sides` of
test_connection_parity); the lines must be the same but for the time and request time."""

from __future__ import annotations

import pytest

from tests.edge.test_connection_parity import Server, fields, logged, sides
from tests.support.rawhttp import exchange

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

"""nginx's request line and head checks (`validate.py`) and what the head meter keeps for the
log; the answers were taken from nginx 1.22 (test_connection_parity.py compares them live)."""

from __future__ import annotations

import pytest

from edgeproxy.edge.limits import HeadMeter
from edgeproxy.edge.validate import head_status, origin_form, request_line_status


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET / HTTP/1.1", None),
        (b"GET /a?b=c HTTP/1.0", None),
        (b"GET http://y/z HTTP/1.1", None),
        (b"GET / HTTP/1.2", None),
        (b"GET /", None),  # HTTP/0.9: the HTTP parser's business
        (b"M-SEARCH / HTTP/1.1", None),
        (b"get / HTTP/1.1", 400),
        (b"GET\t/ HTTP/1.1", 400),
        (b"GET HTTP/1.1", 400),
        (b"GET abc HTTP/1.1", 400),
        (b"GET /a b HTTP/1.1", 400),
        (b"GET /a\x00b HTTP/1.1", 400),
        (b"GET /a\x7fb HTTP/1.1", 400),
        (b"GET / HTTP/1.x", 400),
        (b"GET / HTTP/0.9", 400),
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTP/10.0", 505),
        (b"GET / HTTP/001.01", None),  # nginx counts the value, not the digits
        (b"GET / HTTP/1.100", 400),
        (b"GET / HTTP/1." + b"1" * 5000, 400),  # past int()'s 4300 digits: still nginx's 400
        (b"\x16\x03\x01\x00", 400),
    ],
)
def test_request_line(line: bytes, status: int | None) -> None:
    assert request_line_status(line) == status


@pytest.mark.parametrize(
    ("version", "method", "headers", "target", "status"),
    [
        ("1.1", b"GET", [(b"host", b"x")], b"/", None),
        ("1.0", b"GET", [], b"/", None),
        ("1.1", b"GET", [], b"/", 400),
        ("1.1", b"GET", [(b"host", b"x"), (b"host", b"y")], b"/", 400),
        ("1.1", b"POST", [(b"host", b"x"), (b"transfer-encoding", b"Chunked")], b"/", None),
        ("1.1", b"POST", [(b"host", b"x"), (b"transfer-encoding", b"gzip")], b"/", 501),
        ("1.0", b"POST", [(b"transfer-encoding", b"chunked")], b"/", 400),
        ("1.0", b"POST", [(b"transfer-encoding", b"gzip")], b"/", 400),
        ("1.1", b"GET", [(b"host", b"x")], b"/a/../b", None),
        ("1.1", b"GET", [(b"host", b"x")], b"/..", 400),
        ("1.1", b"GET", [(b"host", b"x")], b"/a/./../../b", 400),
        ("1.1", b"GET", [(b"host", b"x")], b"/%2E%2E/b", 400),
        ("1.1", b"GET", [(b"host", b"x")], b"/a..b/", None),
        ("1.1", b"GET", [(b"host", b"x")], b"http://y/../b?q", 400),
        ("1.1", b"TRACE", [(b"host", b"x")], b"/", 405),
        ("1.1", b"CONNECT", [(b"host", b"x")], b"/", 405),
        ("1.1", b"TRACE", [(b"host", b"x")], b"/../b", 400),  # the path is checked first
    ],
)
def test_head(
    version: str,
    method: bytes,
    headers: list[tuple[bytes, bytes]],
    target: bytes,
    status: int | None,
) -> None:
    assert head_status(version, method, target, headers) == status


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        (b"x", True),
        (b"registry.example:443", True),
        (b"x.", True),  # a trailing dot is dropped
        (b"x.:80", True),
        (b"[::1]:5000", True),
        (b"a\\b", True),  # only / separates paths on Unix
        (b"", False),
        (b".", False),
        (b":80", False),
        (b"a..b", False),
        (b"a/b", False),
        (b"a b", False),
        (b"a\x01b", False),
        (b"a\x7fb", False),
        (b"x:8..0", False),
    ],
)
def test_host_as_nginx_validates_it(host: bytes, valid: bool) -> None:
    status = head_status("1.1", b"GET", b"/", [(b"host", host)])
    assert status == (None if valid else 400)


@pytest.mark.parametrize(
    ("target", "origin"),
    [
        (b"/a?b", b"/a?b"),
        (b"http://y/z?q", b"/z?q"),
        (b"http://y", b"/"),
        (b"http://y?q", b"/?q"),
        (b"http://y:80/", b"/"),
    ],
)
def test_origin_form(target: bytes, origin: bytes) -> None:
    assert origin_form(target) == origin


def test_the_meter_keeps_the_request_line_and_whole_headers_for_the_log() -> None:
    meter = HeadMeter()
    meter.feed(b"\r\nGET /x HTTP/1.1\r\nHost: h\r\nUser-Agent: u\r\nRef")
    assert meter.request_line_done
    assert meter.request_line == b"GET /x HTTP/1.1"
    assert meter.headers() == [(b"host", b"h"), (b"user-agent", b"u")]
    meter.reset()
    meter.feed(b"GET /partial")
    assert meter.begun and not meter.request_line_done
    assert meter.request_line == b"GET /partial"


def test_the_meter_marks_where_the_request_line_ends() -> None:
    meter = HeadMeter()
    meter.feed(b"\r\nGET / HTTP/1.1\nHost: x\n\n")
    assert meter.line_end == 2 + len(b"GET / HTTP/1.1")
    meter.reset()
    meter.feed(b"GET / HT")
    assert not meter.request_line_done and meter.line_end is None
    meter.feed(b"TP/1.1 \r\nHost: x\n\n")
    assert meter.line_end == len(b"TP/1.1 \r")

"""nginx's request head limits as the meter follows them (32 KiB lines, a 32 KiB buffer and
4 large ones); the figures at the boundaries were checked against nginx 1.22."""

from __future__ import annotations

import pytest

from edgeproxy.edge.limits import HeadMeter, HeadTooLarge


def head(uri: int = 1, headers: tuple[int, ...] = ()) -> bytes:
    """A request head: a URI of `uri` bytes, then headers with values of the given sizes."""
    lines = [b"GET /" + b"a" * (uri - 1) + b" HTTP/1.1", b"Host: x"]
    lines += [b"X-%d: " % i + b"b" * size for i, size in enumerate(headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def status(data: bytes, piece: int = 1000) -> int:
    meter = HeadMeter()
    try:
        for i in range(0, len(data), piece):
            meter.feed(data[i : i + piece])
    except HeadTooLarge as exc:
        return exc.status
    return 200


REQUEST_LINE_OVERHEAD = len(b"GET  HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (head(32768 - REQUEST_LINE_OVERHEAD), 200),  # the request line fills the buffer
        (head(32768 - REQUEST_LINE_OVERHEAD + 1), 414),
        (head(40000), 414),
        (head(1, (32768 - len(b"X-0: \r\n"),)), 200),  # a header line of 32 KiB
        (head(1, (32768 - len(b"X-0: \r\n") + 1,)), 400),
        (head(1, (40000,)), 400),
        (head(1, (15000,) * 4), 200),
        (head(1, (20000,) * 5), 200),  # one per buffer: the first and 4 large ones
        (head(1, (20000,) * 6), 400),  # a fifth large buffer
        (head(1, (1000,) * 200), 400),  # 200 KiB of small headers
    ],
)
def test_limits(data: bytes, expected: int) -> None:
    assert status(data) == expected
    assert status(data, piece=1) == expected  # however the bytes arrive
    assert status(data, piece=len(data)) == expected


def test_the_body_and_leading_empty_lines_are_not_the_head() -> None:
    meter = HeadMeter()
    meter.feed(b"\r\n\r\n" + head(20000))
    assert not meter.active
    meter.feed(b"x" * 200_000)  # the body: not metered
    meter.reset()  # the next request on the connection
    assert meter.active
    with pytest.raises(HeadTooLarge) as refused:
        meter.feed(head(40000))
    assert refused.value.status == 414

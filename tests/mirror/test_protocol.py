"""The mirror listener's protocol: Go's limit on a request head, to the byte
(tests/e2e/test_mirror_parity.py holds registry:2 to the same bytes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from edgeproxy.mirror.protocol import MAX_HEAD, TOO_LARGE, RegistryHttpProtocol
from tests.support.transports import Recorder

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"{}"})


def head(size: int, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    """A request head of `size` bytes, its blank line included."""
    start = method + b" /v2/ HTTP/1.1\r\nHost: x\r\n" + extra + b"X-A: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def answers(*requests: list[bytes]) -> tuple[Recorder, bytes]:
    """Each request's pieces fed to one connection in turn, each answered before the next;
    what went out."""

    async def run() -> tuple[Recorder, bytes]:
        config = uvicorn.Config(app, http=RegistryHttpProtocol, log_config=None)
        config.load()
        state = ServerState()
        loop = asyncio.get_running_loop()
        protocol = RegistryHttpProtocol(config=config, server_state=state, app_state={}, _loop=loop)
        transport = Recorder()
        protocol.connection_made(transport)
        for pieces in requests:
            for piece in pieces:
                if not transport.closed:
                    protocol.data_received(piece)
            await asyncio.gather(*state.tasks)
            await asyncio.sleep(0)  # a held head goes at the end of the turn
        return transport, b"".join(transport.sends)

    return asyncio.run(run())


def without_date(answer: bytes) -> bytes:
    return b"".join(line for line in answer.splitlines(True) if not line.startswith(b"date:"))


@pytest.mark.parametrize("split", [0, 1, 2, 3, 4, 100_000])
def test_a_head_of_max_head_bytes_is_served_one_more_is_431(split: int) -> None:
    """Sent whole or with its end (the blank line too) in a read of its own."""
    for size, expected in [(MAX_HEAD, OK), (MAX_HEAD + 1, TOO_LARGE)]:
        data = head(size)
        pieces = [data[: len(data) - split], data[len(data) - split :]]
        transport, sent = answers(pieces)
        assert without_date(sent) == expected, size
        assert transport.closed == (expected == TOO_LARGE)


def test_a_head_that_never_ends_is_cut_at_the_limit() -> None:
    """Header lines that keep coming (httptools keeps them all: 160 MB in, a worker as big)."""
    line = b"X-A: " + b"a" * 8000 + b"\r\n"
    transport, sent = answers([b"GET /v2/ HTTP/1.1\r\n"] + [line * 64] * 100)
    assert sent == TOO_LARGE and transport.closed


def test_each_request_of_a_connection_has_its_own_limit_and_bodies_do_not_count() -> None:
    post = head(MAX_HEAD - 100, b"POST", b"Content-Length: 2000000\r\n")
    transport, sent = answers([head(MAX_HEAD)], [post, b"b" * 2_000_000], [head(MAX_HEAD)])
    assert without_date(sent) == OK * 3 and not transport.closed

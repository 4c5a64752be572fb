"""The blob GET thread: blocks of the asked size, chunked bodies, redirects, errors, close(),
connections kept alive."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeproxy.mirror import blobstream
from edgeproxy.mirror.blobstream import (
    MIN_BLOCK,
    BlobRequest,
    BlobStream,
    BlobStreamError,
    ConnectionPool,
)
from tests.support.ports import free_port
from tests.support.servers import serve_app
from tests.support.wait import wait_until

BODY = os.urandom(3 * 1024 * 1024 + 5)
BLOCK = 1024 * 1024
stalled = threading.Event()


async def whole(request: Request) -> Response:
    return Response(BODY)


async def chunked(request: Request) -> StreamingResponse:
    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(BODY), 100_000):
            yield BODY[start : start + 100_000]

    return StreamingResponse(pieces())


async def stall(request: Request) -> StreamingResponse:
    async def pieces() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        stalled.set()
        await asyncio.sleep(3600)

    return StreamingResponse(pieces(), headers={"Content-Length": "2000"})


async def loop(request: Request) -> RedirectResponse:
    return RedirectResponse("/loop", status_code=307)


client_ports: set[int] = set()


async def counted(request: Request) -> Response:
    assert request.client is not None
    client_ports.add(request.client.port)
    if request.url.path == "/counted/hop":
        return RedirectResponse("/counted", status_code=307)
    return Response(BODY)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/whole", whole),
            Route("/chunked", chunked),
            Route("/stall", stall),
            Route("/loop", loop),
            Route("/counted", counted),
            Route("/counted/hop", counted),
        ]
    )
    with serve_app(app) as url:
        yield url


def request(url: str, pool: ConnectionPool | None = None) -> BlobRequest:
    return BlobRequest(url, {}, pool or ConnectionPool(ssl.create_default_context(), 5.0, 60.0))


async def read(url: str, pool: ConnectionPool | None = None) -> tuple[BlobStream, list[bytearray]]:
    stream = BlobStream(request(url, pool), BLOCK)
    try:
        await stream.open()
        return stream, [block async for block in stream.blocks()]
    finally:
        stream.close()


@pytest.mark.parametrize("path", ["/whole", "/chunked"])
def test_the_body_comes_in_blocks_of_the_asked_size(upstream: str, path: str) -> None:
    stream, blocks = asyncio.run(read(upstream + path))
    assert stream.status == 200
    assert stream.content_length == (len(BODY) if path == "/whole" else None)
    assert [len(block) for block in blocks] == [BLOCK, BLOCK, BLOCK, 5]
    assert b"".join(blocks) == BODY


def test_many_streams_at_once_read_into_smaller_blocks(upstream: str) -> None:
    """Past 64 streams, each stream's block is its share of BLOCKS (64 MiB) as a power of two,
    MIN_BLOCK at least: 300 cold blobs at once behind a slow link held 1 MiB blocks each,
    620-1140 MiB RSS."""
    with contextlib.ExitStack() as others:
        for _ in range(99):  # this one is the 100th: 655 KiB, 512 KiB each
            others.enter_context(blobstream._reading.one())
        _, blocks = asyncio.run(read(upstream + "/whole"))
        assert [len(block) for block in blocks[:6]] == [512 * 1024] * 6
        assert b"".join(blocks) == BODY
        for _ in range(1000 - 99):
            others.enter_context(blobstream._reading.one())
        _, blocks = asyncio.run(read(upstream + "/chunked"))
        assert {len(block) for block in blocks[:-1]} == {MIN_BLOCK}
        assert b"".join(blocks) == BODY
    _, blocks = asyncio.run(read(upstream + "/whole"))  # alone again: the asked size
    assert [len(block) for block in blocks] == [BLOCK, BLOCK, BLOCK, 5]


def test_a_redirect_loop_ends(upstream: str) -> None:
    with pytest.raises(BlobStreamError, match="redirects"):
        asyncio.run(read(upstream + "/loop"))


def test_a_refused_connection_is_an_error() -> None:
    with pytest.raises(BlobStreamError, match="ConnectionRefusedError"):
        asyncio.run(read(f"http://127.0.0.1:{free_port()}/x"))


def test_close_cuts_a_stalled_read_short(upstream: str) -> None:
    """The upstream sent half the body and stalls: close() ends the thread at once, not after
    the 60 s read timeout."""
    threads: list[threading.Thread] = []

    async def main() -> None:
        stalled.clear()
        stream = BlobStream(request(upstream + "/stall"), BLOCK)
        await stream.open()
        threads.extend(t for t in threading.enumerate() if t.name == "edgeproxy-blob")
        await asyncio.to_thread(stalled.wait, 10)
        stream.close()

    asyncio.run(main())
    assert threads
    assert wait_until(lambda: not any(t.is_alive() for t in threads), timeout=10)


def test_connections_are_kept_alive_between_blobs_and_redirects(upstream: str) -> None:
    pool = ConnectionPool(ssl.create_default_context(), 5.0, 60.0)

    async def main() -> None:
        for path in ("/counted", "/counted/hop", "/counted"):
            stream = BlobStream(request(upstream + path, pool), BLOCK)
            try:
                await stream.open()
                assert b"".join([block async for block in stream.blocks()]) == BODY
            finally:
                stream.close()

    client_ports.clear()
    asyncio.run(main())
    pool.close()
    assert len(client_ports) == 1, "four GETs, one connection"


def test_a_kept_connection_the_server_closed_is_replaced(upstream: str) -> None:
    pool = ConnectionPool(ssl.create_default_context(), 5.0, 60.0)
    client_ports.clear()
    asyncio.run(read(upstream + "/counted", pool))
    # The server closing an idle connection looks like this to the next request on it.
    for connections in pool._idle.values():
        for connection, _ in connections:
            assert connection.sock is not None
            connection.sock.shutdown(socket.SHUT_RDWR)
    _, blocks = asyncio.run(read(upstream + "/counted", pool))
    pool.close()
    assert b"".join(blocks) == BODY
    assert len(client_ports) == 2

"""A response's head leaves with its body's first write, or alone at the end of the turn."""

from __future__ import annotations

import asyncio
import socket

from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from edgeproxy.heldhead import HeldHeadProtocol, HeldHeadTransport
from tests.support.servers import serve_app
from tests.support.transports import Recorder


def test_the_head_goes_with_the_first_piece_of_body() -> None:
    asyncio.run(the_head_goes_with_the_first_piece_of_body())


async def the_head_goes_with_the_first_piece_of_body() -> None:
    recorder = Recorder()
    transport = HeldHeadTransport(recorder, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert recorder.sends == []
    transport.write(b"body")
    transport.write(b"more")
    assert recorder.sends == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]
    await asyncio.sleep(0)
    assert recorder.sends == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]


def test_a_head_without_a_body_goes_at_the_end_of_the_turn() -> None:
    """A HEAD's answer, a 304's, or one whose body is not there yet (a cold blob)."""
    asyncio.run(a_head_without_a_body_goes_at_the_end_of_the_turn())


async def a_head_without_a_body_goes_at_the_end_of_the_turn() -> None:
    recorder = Recorder()
    transport = HeldHeadTransport(recorder, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 304 Not Modified\r\n\r\n")
    await asyncio.sleep(0)
    assert recorder.sends == [b"HTTP/1.1 304 Not Modified\r\n\r\n"]
    transport.write(b"later")
    assert recorder.sends[-1] == b"later"


def test_closing_sends_the_head_first() -> None:
    asyncio.run(closing_sends_the_head_first())


async def closing_sends_the_head_first() -> None:
    recorder = Recorder()
    transport = HeldHeadTransport(recorder, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
    transport.close()
    assert recorder.sends == [b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"]
    assert recorder.closed and transport.is_closing()
    await asyncio.sleep(0)
    assert len(recorder.sends) == 1  # the end of the turn finds nothing more to send


def test_a_small_answer_arrives_in_one_piece() -> None:
    """Under uvicorn: the head and the body leave in one writev, which one recv reads whole
    (sent apart, the head would wake the client alone)."""
    app = Starlette(routes=[Route("/", lambda _: Response(b"{}", media_type="application/json"))])
    with serve_app(app, http=HeldHeadProtocol) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = client.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b"{}"

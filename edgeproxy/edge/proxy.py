"""The points-to backend (nginx's `proxy_pass http://host:port`): stream both ways.

Request and response bodies are streamed with aiohttp (3x httpx for bulk bytes; HTTP/1.1 only,
never HTTP/2 for blobs), responses in the pieces as read; nothing holds a whole body. The
request URI is passed unchanged (raw path and query), as proxy_pass without a URI part does;
`Location` is passed untouched (`proxy_redirect off`). The backend's `Server` and `Date` are
replaced by the edge's (nginx hides them too; with server_tokens off and here, no `Server` is
sent at all).
Connect failure → 502, no answer within the timeouts → 504, as nginx answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDict
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from edgeproxy.edge.forward import strip_hop_by_hop
from edgeproxy.edge.pages import send_page

log = logging.getLogger("edgeproxy.edge")

# aiohttp buffers up to twice this of a response before it stops reading the backend.
READ_BUFFER = 1 << 20
# Hidden from the client, as nginx's proxy_hide_header defaults do (it adds its own Date; the
# X-Accel-* are instructions to nginx, never meant for the client).
_HIDDEN_RESPONSE = frozenset(
    {
        b"server",
        b"date",
        b"x-pad",
        b"x-accel-redirect",
        b"x-accel-expires",
        b"x-accel-limit-rate",
        b"x-accel-buffering",
        b"x-accel-charset",
    }
)
# The edge already answered `Expect: 100-continue`; asking the backend again costs a round trip.
_NOT_FORWARDED = frozenset({b"expect"})


class ClientGone(Exception):
    """The client disconnected while its request body was being forwarded."""


class ProxyBackend:
    """An ASGI app forwarding every request to `url` (`http://host:port`)."""

    def __init__(self, url: str, connect_timeout: float, read_timeout: float) -> None:
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=self._timeout,
                auto_decompress=False,
                read_bufsize=READ_BUFFER,
                cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        head = scope["method"] == "HEAD"
        target = self.url + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in scope["headers"]
            if name not in _NOT_FORWARDED
        ]
        if not any(name == b"host" for name, _ in scope["headers"]):
            # An HTTP/1.0 client sent none: nginx's `Host $http_host` then sends none, and an
            # empty Host is HTTP/1.1's "none" (aiohttp would otherwise name the backend).
            headers.append(("Host", ""))
        started = False
        try:
            body = await _request_body(receive)
            async with self._client().request(
                scope["method"],
                URL(target, encoded=True),
                headers=CIMultiDict(headers),
                data=body,
                allow_redirects=False,
                compress=False,
            ) as response:
                out = [
                    (name.lower(), value)
                    for name, value in strip_hop_by_hop(response.raw_headers)
                    if name.lower() not in _HIDDEN_RESPONSE
                ]
                if response.status == 304:  # its length is the 200's: uvicorn would wait for
                    out = [(n, v) for n, v in out if n != b"content-length"]  # that body
                # Without a Content-Length the server chunks (as nginx does to an HTTP/1.1 client).
                start = {"type": "http.response.start", "status": response.status, "headers": out}
                await send(start)
                started = True
                if not head:
                    await _copy_body(response, receive if body is None else None, send)
                await send({"type": "http.response.body", "body": b""})
        except ClientGone:
            return
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            await self._fail(send, scope, started, 504, f"upstream timed out: {exc!r}", head)
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, ClientGone):
                return  # the body's generator saw the client gone (aiohttp wraps it)
            await self._fail(send, scope, started, 502, f"upstream failed: {exc!r}", head)

    async def _fail(
        self, send: Send, scope: Scope, started: bool, status: int, message: str, head: bool
    ) -> None:
        log.error("%s %s → %s: %s", scope["method"], self.url, scope["path"], message)
        if not started:
            await send_page(send, status, head=head)
        # Else the response is already under way: returning without its end cuts the
        # connection, so the client never takes a short body for a whole one.


async def _copy_body(response: aiohttp.ClientResponse, receive: Receive | None, send: Send) -> None:
    """The backend's body to the client, in the pieces as they arrived (iter_chunked's joins
    into 1 MiB cost 30% more CPU per GiB here; pieces run up to uvloop's 256 KiB reads).

    A client that leaves stops the copy (and so the backend's download), as nginx closes its
    upstream: uvicorn's send() returns quietly once the client is gone. `receive` tells, once
    the request body has been read (None: it may not have been, so nobody else may receive).
    """
    gone = asyncio.ensure_future(_until_gone(receive)) if receive is not None else None
    try:
        async for chunk in response.content.iter_any():
            if gone is not None and gone.done():
                raise ClientGone
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        if gone is not None:
            gone.cancel()


async def _until_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _request_body(receive: Receive) -> AsyncIterator[bytes] | None:
    """The request body as a stream, or None when there is none (checked with one receive)."""
    first = await receive()
    if first["type"] == "http.disconnect":
        raise ClientGone
    if not first.get("more_body") and not first.get("body"):
        return None
    return _stream_body(first, receive)


async def _stream_body(first: Message, receive: Receive) -> AsyncIterator[bytes]:
    message = first
    while True:
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return
        message = await receive()

"""The edge's ASGI app for one listener: what the seed's `server` blocks do, in front of a backend.

- plain HTTP with TLS configured: `rewrite ^(.*) https://$server_name$1 permanent;` (301);
- a body over client_max_body_size: by Content-Length → 413 before the body is read; sent
  chunked → 413 as soon as the bytes read cross it, the backend seeing a client gone;
- else the backend (the mirror's ASGI app in-process, or `ProxyBackend`) gets the request with
  the forwarded headers (`forward.py`) in its scope;
- the backend's responses pass the seed's gzip (`gzip.py`) when `[edge.gzip] enabled`;
- one access log line per request (`accesslog.py`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeproxy.config import EdgeConfig
from edgeproxy.edge import tls
from edgeproxy.edge.accesslog import (
    REQUEST_BODY_LOGGED,
    AccessLog,
    Entry,
    request_entry,
)
from edgeproxy.edge.forward import forwarded_headers, header
from edgeproxy.edge.gzip import GzipMiddleware
from edgeproxy.edge.pages import send_page
from edgeproxy.edge.protocol import ANSWERED_KEY, GONE_KEY, REQUEST_LINE_KEY, TIMED_OUT_KEY
from edgeproxy.logs import request_line
from edgeproxy.mirror.cache_status import cache_state

log = logging.getLogger("edgeproxy.edge")


class EdgeApp:
    """The edge in front of `backend` (an ASGI app), for the http and https listeners alike."""

    def __init__(self, config: EdgeConfig, backend: ASGIApp, access_log: AccessLog) -> None:
        self.config = config
        # Inside the access log's counting: $body_bytes_sent counts compressed bytes, as nginx's.
        self.backend = GzipMiddleware(backend) if config.gzip.enabled else backend
        self.access_log = access_log
        self._https_port = config.https[1] if config.https else 443

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        began = time.monotonic()
        exchange = _Exchange(receive, send, self.config.client_max_body_size, scope)
        exchange.close = self.config.keepalive_timeout == 0  # nginx: keep-alive off
        # nginx reads a body before it answers; the embedded mirror answers writes (405)
        # without reading them: a chunked body over the limit must still get the 413.
        exchange.read_before_answer = self.config.embedded and exchange.chunked_request
        try:
            await self._handle(scope, exchange)
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not exchange.started:
                await send_page(exchange.send, 500, head=scope["method"] == "HEAD", close=True)
        finally:
            self.access_log.write(self._entry(scope, exchange, time.monotonic() - began))

    async def _handle(self, scope: Scope, exchange: _Exchange) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        head = scope["method"] == "HEAD"
        if scope["scheme"] == "http" and self.config.tls is not None:
            location = self._redirect_location(scope, header(headers, b"host"))
            await send_page(exchange.send, 301, [(b"location", location)], head=head)
            return
        length = header(headers, b"content-length")
        limit = self.config.client_max_body_size
        if length is not None and limit and _too_large(length, limit):
            # nginx answers before reading the body, and closes the connection after.
            await send_page(exchange.send, 413, head=head, close=True)
            return
        client = scope.get("client")
        backend_scope = dict(scope)
        backend_scope["headers"] = forwarded_headers(
            headers, scope["scheme"], client[0] if client else None
        )
        answer = self.backend(backend_scope, exchange.receive, exchange.send)
        await _unless_gone(answer, scope.get(GONE_KEY), exchange)

    def _redirect_location(self, scope: Scope, host: bytes | None) -> bytes:
        """https://<server_name><request URI>; the port is added when https is not on 443.

        With no server_name, the host the client asked for (nginx's $host) is used.
        """
        name = self.config.server_name
        if not name and host:
            name = _strip_port(host.decode("latin-1"))
        authority = name if self._https_port == 443 else f"{name}:{self._https_port}"
        uri: bytes = scope["raw_path"]
        if scope["query_string"]:
            uri += b"?" + scope["query_string"]
        return b"https://" + authority.encode("latin-1") + uri

    def _entry(self, scope: Scope, exchange: _Exchange, seconds: float) -> Entry:
        request: bytes | None = scope.get(REQUEST_LINE_KEY)  # as received: nginx's $request
        if request is None:  # a pipelined request the meter missed: from its parts
            request = request_line(scope)
        # A request whose body broke is answered by the connection (protocol.py).
        status, body_bytes_sent = scope.get(ANSWERED_KEY) or (
            exchange.status,
            exchange.body_bytes_sent,
        )
        return request_entry(
            self.config.server_name,
            scope.get("client"),
            scope["headers"],
            request,
            # A client gone before the answer: nginx's 499; 408 if it was too slow to send, 400
            # if it left in the middle of its body.
            status or (408 if scope.get(TIMED_OUT_KEY) else 400 if exchange.body_cut else 499),
            body_bytes_sent=body_bytes_sent,
            tls=scope.get(tls.SCOPE_KEY),
            seconds=seconds,
            request_body=exchange.logged_body(),
            cache=cache_state(exchange.cache_status),
        )


class _Exchange:
    """The client's side of one request: what was received and sent, for the access log; and
    the body limit for a body sent without Content-Length (0: none, as in nginx)."""

    def __init__(self, receive: Receive, send: Send, body_limit: int, scope: Scope) -> None:
        self._receive = receive
        self._send = send
        self._body_limit = body_limit
        headers = scope["headers"]
        self.chunked_request = header(headers, b"transfer-encoding") is not None
        length = header(headers, b"content-length")
        self._has_body = self.chunked_request or (length or b"0").strip() not in (b"0", b"")
        # nginx logs a body declared and empty as "" (one not declared, or not read: "-").
        self._empty_body = length is not None and length.strip() == b"0"
        self._head = scope["method"] == "HEAD"
        self._http10 = scope["http_version"] == "1.0"
        # uvicorn sends "100 Continue" at the first receive() before the answer; nginx counts
        # it in $body_bytes_sent.
        expect = header(headers, b"expect")
        self._continue = expect is not None and expect.lower() == b"100-continue"
        self._chunked = False  # the response goes chunked (uvicorn's rule, below)
        self._refused = False
        self._body_done = False
        self._gone = False  # the client left (uvicorn said http.disconnect)
        self.read_before_answer = False
        self.close = False  # answer with Connection: close (uvicorn then closes)
        self.started = False
        self.status = 0
        self.cache_status: bytes | None = None
        self.body_bytes_sent = 0
        self._body: list[bytes] = []
        self._body_size = 0

    async def receive(self) -> Message:
        if self._refused:
            return {"type": "http.disconnect"}
        if self._continue and not self.started:
            self.body_bytes_sent += len(CONTINUE)
        self._continue = False
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self._gone = True
        elif not message.get("more_body"):
            self._body_done = True
            if self.chunked_request:
                self._empty_body = self._empty_body or not (self._body_size or message["body"])
        chunk = message.get("body", b"")
        if chunk:
            if self._body_size + len(chunk) <= REQUEST_BODY_LOGGED:
                self._body.append(chunk)
            self._body_size += len(chunk)
            if self._body_limit and self._body_size > self._body_limit:
                await self._refuse()
                return {"type": "http.disconnect"}
        return message

    async def _refuse(self) -> None:
        """413 and close, as nginx answers while it reads; the backend sees the client gone
        (a points-to backend's request is cut, never ended as if whole), and what it still
        sends is dropped."""
        self.read_before_answer = False  # the 413 goes now, not once the body has ended
        if not self.started:
            await send_page(self.send, 413, close=True)
        self._refused = True

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self.read_before_answer:
            while not (self._body_done or self._refused or self._gone):
                await self.receive()  # counted, then dropped
        if self._refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            raw: Any = message.get("headers", [])
            if self.close and header(raw, b"connection") is None:
                raw = [*raw, (b"connection", b"close")]
                message = {**message, "headers": raw}
            self.cache_status = header(raw, b"cache-status")
            # As uvicorn frames it: chunked without a length, but for HEAD, 204 and 304, and
            # to HTTP/1.0 (protocol.py: the connection's end ends the body).
            encoding = header(raw, b"transfer-encoding")
            self._chunked = (encoding or b"").lower() == b"chunked" or (
                header(raw, b"content-length") is None
                and not self._head
                and self.status not in (204, 304)
                and not self._http10
            )
        elif message["type"] == "http.response.body":
            # $body_bytes_sent: the body as sent, with its chunk framing, as nginx counts.
            size = len(message.get("body", b""))
            if self._chunked:
                size += len(b"%x\r\n\r\n" % size) if size else 0
                size += 0 if message.get("more_body") else len(b"0\r\n\r\n")
            self.body_bytes_sent += size
        await self._send(message)

    @property
    def body_cut(self) -> bool:
        """Whether the client left in the middle of its body (nginx logs that 400, not 499)."""
        return self._has_body and not self._body_done

    def logged_body(self) -> bytes | None:
        """$request_body: the body if it fit nginx's in-memory buffer ("" for a body declared
        and empty), else None; unlike nginx, with the secrets of a urlencoded form masked."""
        if not self._body_size:
            return b"" if self._empty_body else None
        if self._body_size > REQUEST_BODY_LOGGED:
            return None
        return _FORM_SECRET.sub(rb"\1\2=***", b"".join(self._body))


# A password in a form body, as containerd POSTs one to a token endpoint (OAuth2's password
# grant): nginx would log it with $request_body; a log is no place for it.
_FORM_SECRET = re.compile(rb"(?i)(^|&)(password|refresh_token|client_secret)=[^&]*")


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def _unless_gone(
    answer: Awaitable[None], gone: asyncio.Future[None] | None, exchange: _Exchange
) -> None:
    """Run the backend's answer, unless the client leaves before it begins: nginx then
    closes the backend's connection and logs 499 (the answer would have gone nowhere, and
    been logged as sent). Once begun, the answer runs to its end, as before."""
    if gone is None:  # served by another protocol: nothing tells
        await answer
        return
    task = asyncio.ensure_future(answer)
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and not exchange.started:
            task.cancel()
        await asyncio.wait((task,))
    finally:
        task.cancel()  # the edge's own task was cancelled (a shutdown): so is the answer
    if not task.cancelled():
        task.result()


def _too_large(length: bytes, limit: int) -> bool:
    try:
        return int(length) > limit
    except ValueError:
        return False  # the HTTP parser refuses a malformed length before we see it


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


async def _lifespan(receive: Receive, send: Send) -> None:
    """The edge holds nothing to start or stop; the server closes the backends."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

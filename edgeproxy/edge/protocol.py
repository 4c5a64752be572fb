"""The edge listeners' HTTP protocol: uvicorn's httptools protocol, plus what nginx does at the
connection level before a request reaches the app:

- the request head limits (`limits.py`): a request line or head over the seed's header
  buffers gets nginx's 414 or 400 page, before httptools has gathered more than they hold;
- nginx's checks of the request line and head (`validate.py`): its 400 / 405 / 501 / 505
  pages;
- plain HTTP on the https port (see `sniff.py`): nginx's 400 "The plain HTTP request was sent
  to HTTPS port", once the head is read;
- client_header_timeout: a head not complete in time closes the connection without an answer
  (logged 408 if any of it came, as nginx does); client_body_timeout likewise between two
  reads of a body (the app logs the request 408);
- lingering close: after an answer to a request whose bytes still arrive, stop sending but go
  on reading (and dropping) them for a while, so the client reads the answer, not a reset;
- every refusal here gets its access log line; the TLS session's protocol and cipher go in the
  scope for the app's.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Message
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from edgeproxy.edge import tls
from edgeproxy.edge.accesslog import AccessLog, request_entry
from edgeproxy.edge.limits import HeadMeter, HeadTooLarge
from edgeproxy.edge.pages import HEADER_TOO_LARGE, PLAIN_HTTP, page, reason
from edgeproxy.edge.validate import head_status, origin_form, request_line_status
from edgeproxy.heldhead import HeldHeadTransport

log = logging.getLogger("edgeproxy.edge")

# scope[REQUEST_LINE_KEY]: the request line as received, for $request.
REQUEST_LINE_KEY = "edgeproxy.request_line"

# scope[TIMED_OUT_KEY] is True once the client took longer than client_body_timeout.
TIMED_OUT_KEY = "edgeproxy.timed_out"

# scope[ANSWERED_KEY] = (status, page size) once the connection answered the request itself
# (its chunked body broke: nginx's 400 page): what the app logs; its own answer goes nowhere.
ANSWERED_KEY = "edgeproxy.answered"

# scope[GONE_KEY]: a future done once the connection is lost (the client left, or half-closed:
# asyncio then closes the transport), for the app to stop waiting on the backend's answer.
GONE_KEY = "edgeproxy.gone"

# nginx's lingering_timeout and lingering_time defaults.
LINGERING_TIMEOUT = 5.0
LINGERING_TIME = 30.0


@dataclass(frozen=True)
class ConnectionSettings:
    """What an edge connection needs from `[edge]` beyond uvicorn's config."""

    access_log: AccessLog = field(default_factory=lambda: AccessLog("off"))
    server_name: str = ""
    header_timeout: float = 60.0  # client_header_timeout
    body_timeout: float = 60.0  # client_body_timeout
    send_timeout: float = 60.0  # send_timeout


class EdgeHttpProtocol(HttpToolsProtocol):
    _tls: tuple[str, str] | None = None

    def __init__(
        self,
        *args: Any,
        settings: ConnectionSettings | None = None,
        plain_on_tls: bool = False,
        head_deadline: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # nginx takes what llhttp refuses by default: a bare LF ending a line, HTTP/1.2
        # (`validate.py` has refused a version nginx refuses before httptools sees it), any
        # Transfer-Encoding (nginx answers 501 to one it does not know: `head_status`),
        # spaces after a chunk size.
        self.parser.set_dangerous_leniencies(
            lenient_optional_cr_before_lf=True,
            lenient_version=True,
            lenient_transfer_encoding=True,
            lenient_spaces_after_chunk_size=True,
        )
        self.settings = settings or ConnectionSettings()
        self._plain_on_tls = plain_on_tls
        self._head_deadline = head_deadline  # the first head's, from the accept (sniff.py)
        self._head_timer: asyncio.TimerHandle | None = None
        self._receiving = False  # a request's bytes are still arriving
        self._line_checked = False  # this request's line went through request_line_status
        self._held = b""  # the CR or spaces that may end a request line still arriving
        self._refused = False
        self._deferred: tuple[int, str] | None = None  # a refusal waiting for the answer before
        self._in_trailers = False  # the head is done: header callbacks now are trailers
        self._began = 0.0  # when this request's first byte came, for $request_time
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_end = 0.0
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_read = 0.0  # when a piece of the body last came (loop time)
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # the write buffer's size when the send timer was set

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._tls = tls.session(transport)
        self._meter = HeadMeter()
        deadline = self._head_deadline or self.loop.time() + self.settings.header_timeout
        self._head_timer = self.loop.call_at(deadline, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._linger_timer, self._body_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        gone: asyncio.Future[None] | None = None
        if self.cycle is not None:
            gone = self.cycle.scope.get(GONE_KEY)  # type: ignore[assignment]
        if gone is not None and not gone.done():
            gone.set_result(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            self._linger_on()
            return
        if self.transport.is_closing() or self._deferred is not None:
            return  # refused already
        if self._meter.active:
            if not self._meter.begun:
                self._began = time.monotonic()
                if self._head_timer is None:  # the next request of a kept-alive connection
                    self._head_timer = self.loop.call_later(
                        self.settings.header_timeout, self._head_timed_out
                    )
            try:
                self._meter.feed(data)
            except HeadTooLarge as exc:
                self._refuse(exc.status, HEADER_TOO_LARGE if exc.status == 400 else "")
                return
            if self._meter.request_line_done and not self._line_checked:
                self._line_checked = True
                status = request_line_status(self._meter.request_line)
                if status is not None:
                    self._refuse(status)
                    return
            if not self._meter.request_line_done:
                # A CR or spaces that may end the line wait for the next read: its LF decides
                # what llhttp gets (`_request_line_for_llhttp`).
                data = self._held + data
                kept = len(data.rstrip(b"\r "))
                data, self._held = data[:kept], data[kept:]
                if data:
                    super().data_received(data)
                return
            end, held = self._meter.line_end, len(self._held)
            data, self._held = self._held + data, b""
            if end is not None:
                data = _request_line_for_llhttp(data, held + end)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._receiving = True
        self._in_trailers = False
        if self._tls is not None:
            self.scope[tls.SCOPE_KEY] = self._tls  # type: ignore[literal-required]

    def on_header(self, name: bytes, value: bytes) -> None:
        # A chunked body's trailers, dropped as nginx drops them: uvicorn would add them to
        # the request's headers after the head was checked (a trailer Host replacing it).
        # nginx ends a value at its last byte that is not a space (llhttp keeps the spaces).
        if not self._in_trailers:
            super().on_header(name, value.rstrip(b" "))

    def on_headers_complete(self) -> None:
        self._in_trailers = True
        if self._refused:
            return  # a request pipelined after a refused one: never answered
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        version = self.parser.get_http_version()
        status = head_status(version, self.parser.get_method(), self.url, self.headers)
        if status is not None:
            self._refuse(status)
        elif self._plain_on_tls:
            self._refuse(400, PLAIN_HTTP)  # nginx checks this last, once the head is read
        else:
            self.url = origin_form(self.url)
            super().on_headers_complete()
            self.cycle.transport = _CycleTransport(self)
            if version == "1.0":
                self.cycle.keep_alive = _asks_keep_alive(self.headers)
                self.cycle.send = _http10_send(self.cycle)  # type: ignore[method-assign,assignment]
            self.scope[GONE_KEY] = self.loop.create_future()  # type: ignore[literal-required]
            if self._meter.request_line_done:  # not for a pipelined request the meter missed
                self.scope[REQUEST_LINE_KEY] = self._meter.request_line  # type: ignore[literal-required]
            if _has_body(self.headers):
                self._body_read = self.loop.time()
                self._body_timer = self.loop.call_later(
                    self.settings.body_timeout, self._body_timed_out
                )

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            self._body_read = self.loop.time()  # cheaper than a new timer for each piece
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return  # httptools went on with a refused request: nothing more of it counts
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._receiving = False
        self._meter.reset()  # the next request on this connection has its own head
        self._line_checked = False

    def on_response_complete(self) -> None:
        if self._deferred is not None:  # the request after this one was refused: answer it
            status, detail = self._deferred
            self._deferred = None
            if not self.transport.is_closing():
                self._answer(status, detail)
        elif self._linger_timer is None:  # lingering: no next request, no keep-alive timer
            super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """What httptools cannot parse: nginx's 400 page (uvicorn's is plain text)."""
        self._refuse(400)

    def _head_timed_out(self) -> None:
        """client_header_timeout: nginx closes without an answer; a request begun is logged
        with 408 (one not begun is not)."""
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._meter.begun:
            log.info("client %s timed out sending a request head", self._client_addr())
            self._log(408, 0)
        self.transport.close()

    def _body_timed_out(self) -> None:
        """client_body_timeout, counted while reading (not while the app is slow to take the
        body): nginx closes without an answer and logs 408; the app sees the client gone."""
        now = self.loop.time()
        if self.flow.read_paused:
            self._body_read = now  # the app is slow to take the body, not the client to send it
        idle = now - self._body_read
        if idle < self.settings.body_timeout:
            self._body_timer = self.loop.call_later(
                self.settings.body_timeout - idle, self._body_timed_out
            )
            return
        self._body_timer = None
        if self.transport.is_closing() or self._linger_timer is not None:
            return
        log.info("client %s timed out sending a request body", self._client_addr())
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.scope[TIMED_OUT_KEY] = True  # type: ignore[literal-required]
        self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._set_send_timer()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _set_send_timer(self) -> None:
        self._unsent = self.transport.get_write_buffer_size()
        self._send_timer = self.loop.call_later(self.settings.send_timeout, self._send_timed_out)

    def _send_timed_out(self) -> None:
        """send_timeout: nginx closes a connection whose client took nothing of the answer for
        that long (between two writes, not for the whole answer). A client that took some of
        it meanwhile gets another period: it is cut between one and two periods after the
        last byte it took. The request is logged as it was answered; the app sees the client
        gone."""
        self._send_timer = None
        if self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() < self._unsent:
            self._set_send_timer()
            return
        log.info("client %s timed out reading a response", self._client_addr())
        self.transport.abort()  # close() would wait for the buffer to drain: it never will

    def _refuse(self, status: int, detail: str = "") -> None:
        """nginx's answer to a request refused before the app; then close, lingering."""
        if self._refused:
            return
        what = f"{status} ({detail})" if detail else str(status)
        log.info("client %s sent a bad request: %s", self._client_addr(), what)
        self._refused = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._answer(status, detail)
        elif not (self._receiving and cycle.scope is self.scope):
            # A request pipelined after one not yet answered: nginx answers them in order (and
            # reads no more meanwhile: no client_header_timeout for the one waiting).
            self._deferred = (status, detail)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif cycle.response_started:
            self.transport.close()  # its body broke while it was answered: no second answer
        else:
            # Its body broke (a bad chunk): the page answers it, the app sees the client gone
            # and logs the request as answered here.
            body_bytes = len(page(status, detail))
            cycle.scope[ANSWERED_KEY] = (status, body_bytes)  # type: ignore[literal-required]
            cycle.disconnected = True
            cycle.message_event.set()
            self._answer(status, detail, logged=False)

    def _answer(self, status: int, detail: str, logged: bool = True) -> None:
        """Send nginx's page for a refused request, log it, and close, lingering."""
        body = page(status, detail)
        lines = [f"HTTP/1.1 {status} {reason(status)}".encode()]
        lines += [name + b": " + value for name, value in self.server_state.default_headers]
        lines += [
            b"content-type: text/html",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        if logged:
            self._log(status, len(body))
        self._linger()

    def _log(self, status: int, body_bytes_sent: int) -> None:
        entry = request_entry(
            self.settings.server_name,
            self.client,
            self._meter.headers(),
            self._meter.request_line,
            status,
            body_bytes_sent=body_bytes_sent,
            tls=self._tls,
            seconds=time.monotonic() - self._began,
        )
        self.settings.access_log.write(entry)

    def close_after_response(self) -> None:
        """The app answered with Connection: close; linger if the request is still arriving
        (a body refused with 413, or not read)."""
        if self._receiving:
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        """nginx's lingering close: the answer is sent and the sending side shut (FIN, on plain
        TCP: a TLS transport cannot half-close), the client's bytes are read and dropped until
        none came for LINGERING_TIMEOUT or LINGERING_TIME passed; then close."""
        if self._linger_timer is not None or self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()  # uvicorn may have paused it for a body
        self._linger_end = self.loop.time() + LINGERING_TIME
        self._linger_on()

    def _linger_on(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        delay = min(LINGERING_TIMEOUT, self._linger_end - self.loop.time())
        self._linger_timer = self.loop.call_later(max(delay, 0), self.transport.close)

    def _client_addr(self) -> str:
        return self.client[0] if self.client else "-"


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _request_line_for_llhttp(data: bytes, end: int) -> bytes:
    """nginx takes a request line ended by a bare LF, or with spaces after the version; llhttp
    does not (it takes a bare LF in headers only): end it with CR LF and no spaces for it.
    `data` holds the whole line (and any empty lines before it); its LF is at `end`."""
    if data[end - 1 : end] == b"\r" and data[end - 2 : end - 1] != b" ":
        return data  # as nearly every client sends it
    start = data.rfind(b"\n", 0, end) + 1
    line = data[start:end].rstrip(b"\r ")
    return data[:start] + line + b"\r\n" + data[end + 1 :]


def _asks_keep_alive(headers: list[tuple[bytes, bytes]]) -> bool:
    """An HTTP/1.0 request's Connection asks for keep-alive, "close" winning: nginx keeps such
    a connection, uvicorn none."""
    tokens = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    return b"keep-alive" in tokens and b"close" not in tokens


def _http10_send(cycle: RequestResponseCycle) -> Callable[[Message], Awaitable[None]]:
    """The cycle's send() for an HTTP/1.0 request, as nginx answers one:
    - an answer without a length ends where the connection closes (uvicorn would chunk it,
      which HTTP/1.0 clients cannot read: RFC 9112 never chunks to a 1.0 request);
    - a connection kept alive says so (a 1.0 client takes it to close otherwise)."""
    send = cycle.send
    unsized = False

    async def http10_send(message: Message) -> None:
        nonlocal unsized
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            unsized = (
                not any(name.lower() in _FRAMED for name, _ in headers)
                and cycle.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
            )
            if unsized:  # uvicorn then neither chunks nor counts against a length
                cycle.chunked_encoding = False
                cycle.expected_content_length = sys.maxsize
                cycle.keep_alive = False
            elif cycle.keep_alive and all(name.lower() != b"connection" for name, _ in headers):
                message = {**message, "headers": [*headers, (b"connection", b"keep-alive")]}
        elif unsized and not message.get("more_body"):
            cycle.expected_content_length = len(message.get("body", b""))  # all there is
        await send(message)  # type: ignore[arg-type]  # an ASGI message, as uvicorn's own

    return http10_send


_FRAMED = (b"content-length", b"transfer-encoding")


class _CycleTransport(HeldHeadTransport):
    """What uvicorn's request cycle writes to: the connection (the answer's head held for its
    body), but closing it after an answer goes through `close_after_response` (a lingering
    close when the request still arrives)."""

    def __init__(self, protocol: EdgeHttpProtocol) -> None:
        super().__init__(protocol.transport, protocol.loop)
        self._protocol = protocol

    def is_closing(self) -> bool:
        return super().is_closing() or self._protocol._linger_timer is not None

    def close(self) -> None:
        self.flush()
        self._protocol.close_after_response()

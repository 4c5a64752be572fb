"""The edge listeners' HTTP protocol: uvicorn's httptools protocol, plus

- nginx's request head limits (`limits.py`): a request line or head over the seed's header
  buffers gets nginx's 414 or 400 page and the connection is closed, before httptools has
  gathered more than the buffers would hold;
- the TLS session's protocol and cipher in the scope, for the access log.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgeproxy.edge import tls
from edgeproxy.edge.limits import HeadMeter, HeadTooLarge
from edgeproxy.edge.pages import HEADER_TOO_LARGE, page, reason

log = logging.getLogger("edgeproxy.edge")


class EdgeHttpProtocol(HttpToolsProtocol):
    _tls: tuple[str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._tls = tls.session(transport)
        self._meter = HeadMeter()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused already
        if self._meter.active:
            try:
                self._meter.feed(data)
            except HeadTooLarge as exc:
                self._refuse(exc.status)
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope[tls.SCOPE_KEY] = self._tls  # type: ignore[literal-required]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._meter.reset()  # the next request on this connection has its own head

    def _refuse(self, status: int) -> None:
        """nginx's answer to a head over its buffers, then close (nginx closes too)."""
        what = "too long request line" if status == 414 else "too large request head"
        log.info("client %s sent a %s: %d", self.client and self.client[0], what, status)
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined request's answer would cut into this one
            return
        body = page(status, HEADER_TOO_LARGE if status == 400 else "")
        lines = [f"HTTP/1.1 {status} {reason(status)}".encode()]
        lines += [name + b": " + value for name, value in self.server_state.default_headers]
        lines += [
            b"content-type: text/html",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.close()

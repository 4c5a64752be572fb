"""The https listener's first protocol: TLS or plain HTTP, told by the first byte.

nginx answers plain HTTP sent to its TLS port with a 400 page ("The plain HTTP request was sent
to HTTPS port") where a TLS server would just fail the handshake. So the listener is a plain
TCP server: a connection whose first byte starts a TLS handshake record (0x16) gets the event
loop's own SSL protocol (uvloop's, or asyncio's), fed the bytes already read; any other gets
the HTTP protocol directly, which refuses it once the head is read. Either way the head must
be in by client_header_timeout from the accept, the TLS handshake included, as in nginx.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from typing import Any, cast

import uvloop

from edgeproxy.edge.protocol import ConnectionSettings, EdgeHttpProtocol

TLS_HANDSHAKE = 0x16  # the content type of a TLS record carrying a ClientHello


class TlsSniffer(asyncio.Protocol):
    """Waits for a connection's first bytes, then hands it over for good."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        *,
        settings: ConnectionSettings,
        context: ssl.SSLContext,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._http_options = {"config": config, "server_state": server_state}
        self._app_state = app_state
        self._settings = settings
        self._context = context
        self._loop = _loop or asyncio.get_event_loop()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        self._deadline = self._loop.time() + self._settings.header_timeout
        # Nothing came in time: nginx closes without a word or a log line.
        self._timer = self._loop.call_at(self._deadline, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None and self._timer is not None
        self._timer.cancel()
        http = EdgeHttpProtocol(
            **self._http_options,
            app_state=self._app_state,
            settings=self._settings,
            plain_on_tls=data[0] != TLS_HANDSHAKE,
            head_deadline=self._deadline,
        )
        if data[0] != TLS_HANDSHAKE:
            transport.set_protocol(http)
            http.connection_made(transport)
            http.data_received(data)
            return
        remaining = max(self._deadline - self._loop.time(), 0.001)
        tls = _ssl_protocol(self._loop, http, self._context, remaining)
        transport.set_protocol(tls)
        tls.connection_made(transport)
        while data:  # what was read already goes to the TLS protocol first
            buffer = memoryview(tls.get_buffer(len(data)))
            size = min(len(buffer), len(data))
            buffer[:size] = data[:size]
            tls.buffer_updated(size)
            data = data[size:]


def _ssl_protocol(
    loop: asyncio.AbstractEventLoop,
    app_protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    handshake_timeout: float,
) -> Any:
    """The loop's server-side SSL protocol over `app_protocol` (what `loop.start_tls` builds)."""
    factory: Any = sslproto.SSLProtocol
    if isinstance(loop, uvloop.Loop):  # edgeproxy's loop; tests serve on asyncio's too
        factory = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
    return factory(
        loop,
        app_protocol,
        context,
        None,
        server_side=True,
        ssl_handshake_timeout=handshake_timeout,
    )

"""A response's head held back until its body's first write, so that both leave in one send.

uvicorn writes the status line and headers as soon as the app starts its answer, then each
piece of the body: a small answer (a manifest, an error) cost two sends where nginx and Go
make one, and a send is most of what a manifest served from memory costs (bench/README.md).
The head waits for the rest of the event loop's turn at most: an answer whose body comes
later (a cold blob's), or never (a HEAD's, a 304's), sends its head alone then.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

Data = bytes | bytearray | memoryview


class HeldHeadTransport(asyncio.Transport):
    """What one request cycle writes to: `transport`, its first write held until the next
    one (then both go in one writev) or the end of the loop's turn."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: Data | None = None
        self._first = True

    def write(self, data: Data) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        elif self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send what is held, if anything."""
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class HeldHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, each request's answer written through a
    `HeldHeadTransport`."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.cycle.transport = HeldHeadTransport(self.transport, self.loop)

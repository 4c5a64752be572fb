"""The HTTP protocol of the mirror's and the metrics listeners (registry:2's `http.addr` and
`debug.addr`): uvicorn's, the head of each answer held for its body, with Go's limit on a
request head.

httptools takes a head of any size: uvicorn kept every header line of one that never ended
(160 MB sent, the worker grew by as much). Go's net/http, which registry:2 serves with, reads
a request line and headers of up to `http.DefaultMaxHeaderBytes` (1 MiB) plus the 4096 bytes
of slack its reader allows, and answers a longer head 431 before closing the connection.
"""

from __future__ import annotations

import logging
from typing import Any

from edgeproxy.heldhead import HeldHeadProtocol

log = logging.getLogger("edgeproxy.mirror")

MAX_HEAD = (1 << 20) + 4096
TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n"
    b"431 Request Header Fields Too Large"
)


class RegistryHttpProtocol(HeldHeadProtocol):
    """Counts a request head's bytes as they arrive, up to its blank line; past `MAX_HEAD`,
    answers 431 (as Go's server does) and closes the connection before httptools reads on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = True  # the next bytes are (still) a request's head
        self._head_bytes = 0
        self._tail = b""  # the last bytes of the head so far: its blank line may span reads

    def data_received(self, data: bytes) -> None:
        if self._head_open:
            seen = self._tail + data
            end = _head_end(seen)
            if end < 0:
                self._head_bytes += len(data)
                self._tail = seen[-2:]
            else:
                self._head_bytes += end - len(self._tail)
                self._head_open = False  # the body, if any, is not counted
            if self._head_bytes > MAX_HEAD:
                self._refuse()
                return
        super().data_received(data)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_open, self._head_bytes, self._tail = True, 0, b""  # the next request's

    def _refuse(self) -> None:
        host, port = self.client or ("?", 0)
        log.info("%s:%s: a request head over %d bytes: 431", host, port, MAX_HEAD)
        if self.cycle is None or self.cycle.response_complete:  # no answer under way
            self.transport.write(TOO_LARGE)
        self.transport.close()


def _head_end(data: bytes) -> int:
    """Where a head's blank line ends in `data` (CRLF or a bare LF, as llhttp takes it), or
    -1 when it has none."""
    ends = [i + 3 for i in (data.find(b"\n\r\n"),) if i >= 0]
    ends += [i + 2 for i in (data.find(b"\n\n"),) if i >= 0]
    return min(ends, default=-1)

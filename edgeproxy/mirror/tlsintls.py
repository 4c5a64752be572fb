"""TLS inside TLS for the blob threads: an https upstream through an https:// proxy.

ssl.SSLSocket speaks TLS over a file descriptor only. Here the upstream's TLS runs over the
proxy's TLS socket as an ssl.SSLObject between two memory BIOs, as asyncio's start_tls (and so
httpx) does it. `TLSInTLS` has only what http.client and blobstream call on a socket.
"""

from __future__ import annotations

import io
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar, cast

CHUNK = 64 * 1024  # read from the proxy's socket at once (it returns one TLS record at most)

T = TypeVar("T")


class TLSInTLS:
    """A TLS connection to `server_hostname` over `outer`, the proxy's TLS socket once its
    CONNECT succeeded. Closing it closes `outer`."""

    def __init__(self, outer: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        """Shake hands with the server; raises OSError (ssl.SSLError: an untrusted certificate)."""
        self._outer = outer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, False, server_hostname)
        self._io_refs = 0  # open makefile()s: as a socket's, they keep it open once closed
        self._closed = False
        self._call(self._tls.do_handshake)

    def _call(self, operation: Callable[..., T], *args: object) -> T:
        """`operation` of the SSLObject, fed from the proxy's socket as long as it wants more."""
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._flush()
                data = self._outer.recv(CHUNK)
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()  # the next call raises SSLEOFError
                continue
            self._flush()
            return result

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._outer.sendall(self._outgoing.read())

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._call(self._tls.write, view) :]

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0) -> int:
        try:
            return cast(int, self._call(self._tls.read, nbytes or len(buffer), buffer))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0  # the end, with close_notify or without (as SSLSocket's ragged EOFs)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        """A reader of the plain text (http.client's HTTPResponse reads through one)."""
        if mode != "rb":
            raise ValueError(f"mode {mode!r}: only 'rb' is supported")
        self._io_refs += 1
        return io.BufferedReader(socket.SocketIO(cast(socket.socket, self), "rb"))

    def settimeout(self, timeout: float | None) -> None:
        self._outer.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._outer.gettimeout()

    def shutdown(self, how: int) -> None:
        """Cut the connection, a read in progress in another thread included. The socket's
        own shutdown: SSLSocket's drops its TLS state under that read."""
        socket.socket.shutdown(self._outer, how)

    def fileno(self) -> int:
        return self._outer.fileno()

    def close(self) -> None:
        self._closed = True
        if self._io_refs <= 0:
            self._outer.close()

    def _decref_socketios(self) -> None:  # socket.SocketIO's close() calls it
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed:
            self.close()

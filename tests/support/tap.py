"""A recording TCP tap: relays bytes between its clients and a target port, unchanged, and keeps
what the clients sent, to show the request heads a backend really received (the tap does not
answer anything itself: the backend behind it does)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

RELAY_CHUNK = 1 << 16


@dataclass(frozen=True)
class RecordedRequest:
    """One request head as it crossed the tap, and the size of the body that followed."""

    request_line: str
    headers: list[tuple[str, str]]  # names lowercased, in order, values as sent
    body_size: int

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


class TcpTap:
    """Listens on 127.0.0.1 (`port`) and relays every connection to 127.0.0.1:`target_port`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._streams: list[bytearray] = []  # per connection, in accept order
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def clear(self) -> None:
        """Forget what was recorded so far (connections still open record from now on)."""
        with self._lock:
            for stream in self._streams:
                stream.clear()

    def requests(self) -> list[RecordedRequest]:
        """Every request recorded since `clear()`, connection by connection."""
        with self._lock:
            streams = [bytes(stream) for stream in self._streams]
        return [request for stream in streams for request in parse_requests(stream)]

    def close(self) -> None:
        self._closed = True
        with suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()  # the backend is down: the proxy sees a refused-like close
                continue
            server.settimeout(None)
            stream = bytearray()
            with self._lock:
                self._streams.append(stream)
            threading.Thread(target=_relay, args=(client, server, stream), daemon=True).start()
            threading.Thread(target=_relay, args=(server, client, None), daemon=True).start()


def _relay(source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
    """Copy `source` to `sink` until EOF, then half-close `sink` (so each side sees the other's
    close as it happened); keep the bytes in `record` when given."""
    try:
        while data := source.recv(RELAY_CHUNK):
            if record is not None:
                record += data
            sink.sendall(data)
    except OSError:
        pass
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def parse_requests(stream: bytes) -> list[RecordedRequest]:
    """The requests in one connection's client bytes: heads parsed, bodies skipped by their
    Content-Length or chunked framing (a cut-short last request is kept with what arrived)."""
    requests = []
    while stream:
        head, separator, stream = stream.partition(b"\r\n\r\n")
        if not separator:
            break
        lines = head.decode("latin-1").split("\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        fields = dict(headers)
        if fields.get("transfer-encoding", "").lower() == "chunked":
            size, stream = _skip_chunked(stream)
        else:
            size = min(int(fields.get("content-length", "0")), len(stream))
            stream = stream[size:]
        requests.append(RecordedRequest(lines[0], headers, size))
    return requests


def _skip_chunked(stream: bytes) -> tuple[int, bytes]:
    """(the body's size, what follows the chunked body)."""
    total = 0
    while True:
        size_line, separator, stream = stream.partition(b"\r\n")
        if not separator:
            return total, b""
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _, _, stream = stream.partition(b"\r\n")  # no trailers are used here
            return total, stream
        total += size
        stream = stream[size + 2 :]


@contextmanager
def run_tap(target_port: int) -> Iterator[TcpTap]:
    """A `TcpTap` in front of 127.0.0.1:`target_port`, closed afterwards."""
    tap = TcpTap(target_port)
    try:
        yield tap
    finally:
        tap.close()

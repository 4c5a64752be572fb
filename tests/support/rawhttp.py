"""Raw HTTP/1.x over a socket: send exact bytes, read the answer until the server closes."""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]  # names lowercased, in order
    body: bytes  # de-chunked, still encoded

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None


def exchange(
    port: int,
    request: bytes,
    *,
    body: bytes = b"",
    timeout: float = 30,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    """Send `request` (then `body`, tolerating a server that stops reading and closes) to
    127.0.0.1:`port`, over TLS with `tls`; the answer, read until the connection closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as plain:
        conn = tls.wrap_socket(plain, server_hostname="127.0.0.1") if tls else plain
        conn.sendall(request)
        # It may answer early and close: the answer is still readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(body)
        raw = b""
        try:
            while chunk := conn.recv(65536):
                raw += chunk
        except (ConnectionResetError, ssl.SSLEOFError):
            pass  # closed with unread request bytes: what arrived before the reset counts
    return parse(raw)


def parse(raw: bytes) -> Answer:
    """The final answer in `raw` (an interim 100 Continue before it is skipped)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100 "):
        head, _, rest = rest.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    if ("transfer-encoding", "chunked") in headers:
        rest = _dechunk(rest)
    return Answer(status, headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out

"""The access log: the seed's `log_format main`, field for field as nginx prints it, or JSON.

    log_format main '$server_name $remote_addr - $remote_user [$time_local] "$request" - '
                    '$request_body $status $body_bytes_sent "$http_referer" '
                    '"$http_user_agent" "$http_x_forwarded_for" '
                    '$ssl_protocol $ssl_cipher $request_time ';

nginx prints `-` for an empty value and escapes `"`, `\\` and bytes outside 0x20-0x7e as `\\xHH`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from edgeproxy.edge.forward import header

log = logging.getLogger("edgeproxy.accesslog")

# nginx keeps a request body in memory (and so in $request_body) up to client_body_buffer_size,
# 16k on 64-bit platforms; a larger body goes to a temporary file and logs as "-".
REQUEST_BODY_LOGGED = 16 * 1024
WRITE_ERROR_EVERY = 60.0  # seconds between two error lines about a log that cannot be written

_PLAIN = re.compile(rb"[\x20-\x21\x23-\x5b\x5d-\x7e]*")  # what nginx prints as it is
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class Entry:
    """One request, as the log formats need it."""

    server_name: str
    remote_addr: str
    remote_user: str
    time: datetime  # aware, local time, when the request ended (as nginx's $time_local)
    request: str  # the request line: `GET /v2/ HTTP/1.1`
    # Fields from the request (request, remote_user, http_*) hold its bytes as `wire_text`
    # decodes them: escape() gives nginx's escapes of those very bytes.
    request_body: bytes | None  # None: no body, or one too large to keep; b"": declared empty
    status: int
    body_bytes_sent: int
    http_referer: str | None  # None: not sent ("-"); "" sent empty (printed empty, as nginx)
    http_user_agent: str | None
    http_x_forwarded_for: str | None
    ssl_protocol: str
    ssl_cipher: str
    request_time: float  # seconds
    cache: str = ""  # HIT, MISS, STALE, REVALIDATED: from the mirror's Cache-Status


def wire_text(data: bytes) -> str:
    """Bytes of a request as text: UTF-8 where they are, the others kept as surrogates, so
    that escape() gets the same bytes back (latin-1 would print é as \\xC3\\x83\\xC2\\xA9)."""
    return data.decode("utf-8", "surrogateescape")


def escape(value: str | bytes) -> str:
    """nginx's log escaping; an empty value is `-`."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if not data:
        return "-"
    if _PLAIN.fullmatch(data):  # nothing to escape: most values, at a twentieth of the loop
        return data.decode("ascii")
    out = []
    for byte in data:
        if byte < 0x20 or byte > 0x7E or byte in (0x22, 0x5C):
            out.append(f"\\x{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


def header_field(value: str | None) -> str:
    """A $http_* field: "-" for a header not sent, nothing for one sent empty (nginx's
    variable is then found, and empty)."""
    return "" if value == "" else escape(value or "")


def time_local(moment: datetime) -> str:
    """nginx's $time_local: `27/Nov/2026:20:44:50 +0100` (English month names, any locale)."""
    offset = moment.strftime("%z") or "+0000"
    return (
        f"{moment.day:02d}/{_MONTHS[moment.month - 1]}/{moment.year}:"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {offset}"
    )


def format_main(e: Entry) -> str:
    """The line nginx writes with the seed's `main` format (it ends with a space, as there)."""
    # An empty body declared (Content-Length: 0) is printed empty: nginx's $request_body is
    # found, of length 0; without a body it is not found: "-".
    body = "" if e.request_body == b"" else escape(e.request_body or b"")
    fields = (
        f"{escape(e.server_name)} {escape(e.remote_addr)} - {escape(e.remote_user)} "
        f'[{time_local(e.time)}] "{escape(e.request)}" - {body} '
        f'{e.status} {e.body_bytes_sent} "{header_field(e.http_referer)}" '
        f'"{header_field(e.http_user_agent)}" "{header_field(e.http_x_forwarded_for)}" '
        f"{escape(e.ssl_protocol)} {escape(e.ssl_cipher)} {e.request_time:.3f} "
    )
    return fields


def format_json(e: Entry) -> str:
    """One JSON object per line: the `main` fields by name, plus `cache`."""
    record: dict[str, Any] = {
        "time": e.time.isoformat(timespec="milliseconds"),
        "server_name": e.server_name,
        "remote_addr": e.remote_addr,
        "remote_user": e.remote_user,
        "request": e.request,
        "request_body": (e.request_body or b"").decode("utf-8", "replace"),
        "status": e.status,
        "body_bytes_sent": e.body_bytes_sent,
        "http_referer": e.http_referer or "",
        "http_user_agent": e.http_user_agent or "",
        "http_x_forwarded_for": e.http_x_forwarded_for or "",
        "ssl_protocol": e.ssl_protocol,
        "ssl_cipher": e.ssl_cipher,
        "request_time": round(e.request_time, 3),
        "cache": e.cache,
    }
    return json.dumps(record, separators=(",", ":"))


def request_entry(
    server_name: str,
    client: tuple[str, int] | None,
    headers: list[tuple[bytes, bytes]],
    request: bytes,
    status: int,
    *,
    body_bytes_sent: int = 0,
    tls: tuple[str, str] | None = None,
    seconds: float = 0.0,
    request_body: bytes | None = None,
    cache: str = "",
) -> Entry:
    """The entry for a request: its line as received, its headers (names lowercased) give
    $remote_user and the $http_* fields; `tls` is the session's (protocol, cipher); it ends
    now."""

    def text(name: bytes) -> str | None:
        value = header(headers, name)
        return None if value is None else wire_text(value)

    protocol, cipher = tls or ("", "")
    return Entry(
        server_name=server_name,
        remote_addr=client[0] if client else "",
        remote_user=basic_user(header(headers, b"authorization")),
        time=datetime.now().astimezone(),
        request=wire_text(request),
        request_body=request_body,
        status=status,
        body_bytes_sent=body_bytes_sent,
        http_referer=text(b"referer"),
        http_user_agent=text(b"user-agent"),
        http_x_forwarded_for=forwarded_for(headers),
        ssl_protocol=protocol,
        ssl_cipher=cipher,
        request_time=seconds,
        cache=cache,
    )


def forwarded_for(headers: list[tuple[bytes, bytes]]) -> str | None:
    """$http_x_forwarded_for: nginx 1.22 joins every X-Forwarded-For line with ", " (of the
    other headers its $http_* take the first)."""
    values = [value for name, value in headers if name == b"x-forwarded-for"]
    return wire_text(b", ".join(values)) if values else None


def basic_user(authorization: bytes | None) -> str:
    """nginx's $remote_user: the user of a Basic Authorization header, else empty. Decoded as
    nginx does (ngx_http_auth_basic_user): `Basic ` then spaces, base64 read up to the first
    `=` (padding optional), a user only if a `:` follows it."""
    if not authorization or authorization[:6].lower() != b"basic ":
        return ""
    encoded = authorization[6:].lstrip(b" ").partition(b"=")[0]
    if not encoded or len(encoded) % 4 == 1 or not _BASE64.fullmatch(encoded):
        return ""
    decoded = base64.b64decode(encoded + b"=" * (-len(encoded) % 4))
    user, colon, _ = decoded.partition(b":")
    return wire_text(user) if colon else ""


_BASE64 = re.compile(rb"[A-Za-z0-9+/]+")


class AccessLog:
    """Writes one line per request to a file (appended, as nginx does), stdout, or nowhere."""

    def __init__(self, target: str, log_format: str = "main") -> None:
        self._format = format_json if log_format == "json" else format_main
        self._stream: IO[str] | None
        self._path = target if target not in ("off", "-") else None
        if target == "off":
            self._stream = None
        elif target == "-":
            self._stream = sys.stdout
        else:
            self._stream = _open(target)
        self._owned = self._path is not None
        self._failed_at = -WRITE_ERROR_EVERY

    def reopen(self) -> None:
        """Open the file again, as nginx does on SIGUSR1: logrotate has moved it. If it cannot
        be opened, the lines go on to the old one."""
        if self._path is None or self._stream is None:
            return
        try:
            stream = _open(self._path)
        except OSError as exc:
            log.error("access log: cannot reopen %s: %s", self._path, exc.strerror)
            return
        old, self._stream = self._stream, stream
        with contextlib.suppress(OSError):  # its last lines could not be written (a full disk)
            old.close()
        log.info("reopened %s", self._path)

    def write(self, entry: Entry) -> None:
        """One line; one that cannot be written (ENOSPC, EIO, a closed stdout) is dropped
        with an error line at most once a minute: the request it logs is not failed for it."""
        if self._stream is None:
            return
        try:
            self._stream.write(self._format(entry) + "\n")
            if not self._owned:
                self._stream.flush()
        except OSError as exc:
            now = time.monotonic()
            if now - self._failed_at >= WRITE_ERROR_EVERY:
                self._failed_at = now
                log.error("access log: write to %s failed: %s", self._path or "-", exc)

    def close(self) -> None:
        if self._owned and self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
        self._stream = None


def _open(path: str) -> IO[str]:
    return open(path, "a", buffering=1, encoding="utf-8")  # appended, as nginx does

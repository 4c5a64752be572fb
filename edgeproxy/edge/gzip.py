"""The seed's gzip block as ASGI middleware, deciding as nginx 1.22 does (checked against it):

    gzip on; gzip_comp_level 6; gzip_http_version 1.1; gzip_min_length 256;
    gzip_proxied any; gzip_vary on; gzip_types <the seed's list>;
    gzip_disable "MSIE [1-6]\\.(?!.*SV1)";

A response is *eligible* when its status is 200, 403 or 404, it has no Content-Encoding, its
Content-Length (when known) is >= 256 and its type (before the `;` of a charset, else the
whole value; case-insensitive) is in the list or text/html. Every eligible response gets
`Vary: Accept-Encoding` (a line of its own, as nginx adds it), also when it is not
compressed. It is compressed when the request is HTTP/1.1 or later, its Accept-Encoding
names `gzip` with q > 0, and its User-Agent does not match the MSIE pattern
(case-insensitive). `gzip_proxied any`: a `Via` changes nothing.

Compressing drops Content-Length (the server chunks) and Accept-Ranges, makes a strong ETag
weak, adds `Content-Encoding: gzip`. One zlib stream per response, fed as the body arrives:
nothing is buffered beyond zlib's own window. A 206 is never eligible; a Range request that
the backend answers with a whole 200 is, as in nginx. HEAD gets the headers only.
"""

from __future__ import annotations

import re
import zlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeproxy.edge.forward import header

LEVEL = 6
MIN_LENGTH = 256
# gzip_types of the seed, plus text/html, which nginx always compresses.
TYPES = frozenset(
    {
        "text/html",
        "text/xml",
        "application/xml",
        "application/atom+xml",
        "application/rss+xml",
        "application/xhtml+xml",
        "image/svg+xml",
        "text/javascript",
        "application/javascript",
        "application/x-javascript",
        "text/x-json",
        "application/json",
        "application/x-web-app-manifest+json",
        "text/css",
        "text/plain",
        "text/x-component",
        "font/opentype",
        "application/x-font-ttf",
        "application/vnd.ms-fontobject",
        "image/x-icon",
    }
)
STATUSES = frozenset({200, 403, 404})  # the only ones nginx's gzip filter touches
DISABLE = re.compile(rb"MSIE [1-6]\.(?!.*SV1)", re.IGNORECASE)  # nginx compiles it caseless
_VARY = (b"vary", b"Accept-Encoding")
_DROPPED = frozenset({b"content-length", b"accept-ranges"})
# Compressed bytes are held until this many are ready or the body ends: nginx sends its gzip
# output as its buffers fill, so a small body goes out as one chunk (and its framing, counted
# in $body_bytes_sent, is nginx's), not as zlib's 10-byte header first and the rest after.
HOLD = 64 * 1024


def accepts_gzip(accept_encoding: bytes) -> bool:
    """Whether an Accept-Encoding value accepts gzip, read as nginx 1.22 reads it
    (ngx_http_gzip_accept_encoding): its first `gzip` at the start or after `,` or a space
    (`x-gzip` does not count), then spaces, and the end, a `,`, or `;` and a q above 0 (any
    other parameter, or one after the q, refuses it)."""
    lower, start = accept_encoding.lower(), 0
    while True:
        at = lower.find(b"gzip", start)
        if at < 0:
            return False
        if at == start or lower[at - 1 : at] in (b",", b" "):
            break
        start = at + 4
    rest = lower[at + 4 :].lstrip(b" ")
    if not rest or rest.startswith(b","):
        return True
    if not rest.startswith(b";"):
        return False
    rest = rest[1:].lstrip(b" ")
    if not rest:
        return True
    return rest.startswith(b"q=") and len(rest) > 2 and _quantity(rest[2:]) > 0


def _quantity(value: bytes) -> int:
    """ngx_http_gzip_quantity: a q as 0-100, 0 if malformed (more than 3 decimals, over 1, not
    starting with 0 or 1). nginx adds the decimals up, whatever their place: kept here."""
    if value[:1] not in (b"0", b"1"):
        return 0
    q = (value[0] - 0x30) * 100
    if len(value) == 1 or value[1:2] in (b",", b" "):
        return q
    if value[1:2] != b".":
        return 0
    decimals = 0
    for byte in value[2:]:
        if byte in b", ":
            break
        if not 0x30 <= byte <= 0x39:
            return 0
        q += byte - 0x30
        decimals += 1
    return 0 if q > 100 or decimals > 3 else q


def client_wants_gzip(scope: Scope) -> bool:
    """The request side of the decision: HTTP/1.1+, gzip accepted, not an old MSIE."""
    if scope["http_version"] in ("0.9", "1.0"):
        return False
    # nginx 1.22 reads the first Accept-Encoding and the first User-Agent only.
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    if not accepts_gzip(header(headers, b"accept-encoding") or b""):
        return False
    return DISABLE.search(header(headers, b"user-agent") or b"") is None


def eligible(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """The response side: status, no encoding yet, Content-Length >= 256 if known, the type."""
    if status not in STATUSES:
        return False
    content_type = b""
    for name, value in headers:
        if name == b"content-encoding" and value.strip():
            return False
        if name == b"content-length":
            try:
                if int(value) < MIN_LENGTH:
                    return False
            except ValueError:
                return False
        elif name == b"content-type":
            content_type = value
    return media_type(content_type.strip()).lower().decode("latin-1") in TYPES


def media_type(content_type: bytes) -> bytes:
    """The type nginx matches against gzip_types (ngx_http_upstream_copy_content_type): what
    precedes the `;` of a `charset=` parameter, spaces included ("application/json ;
    charset=x" is no match); without a charset, the whole value, parameters and all."""
    charset = _CHARSET.search(content_type)
    return content_type[: charset.start()] if charset else content_type


_CHARSET = re.compile(rb";(?=[ ]*charset=)", re.IGNORECASE)


def compressed_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers of a compressed response: no length, no ranges, a weak ETag, gzip."""
    out = []
    for name, value in headers:
        if name in _DROPPED:
            continue
        if name == b"etag" and not value.startswith(b"W/"):
            if not value.startswith(b'"'):
                continue  # nginx drops an ETag it cannot weaken
            value = b"W/" + value
        out.append((name, value))
    out.append((b"content-encoding", b"gzip"))
    return out


class GzipMiddleware:
    """Compresses the eligible responses of `app` for the clients that want gzip."""

    def __init__(self, app: ASGIApp, level: int = LEVEL) -> None:
        self.app = app
        self.level = level

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = _Response(send, client_wants_gzip(scope), scope["method"] == "HEAD", self.level)
        await self.app(scope, receive, response.send)


class _Response:
    """One response on its way out: headers decided at the start, the body compressed after."""

    def __init__(self, send: Send, wanted: bool, head: bool, level: int) -> None:
        self._send = send
        self._wanted = wanted
        self._head = head
        self._level = level
        self._compressor: zlib._Compress | None = None
        self._held: list[bytes] = []
        self._held_size = 0

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers: list[tuple[bytes, bytes]] = list(message.get("headers", []))
            if eligible(message["status"], headers):
                headers.append(_VARY)
                if self._wanted:
                    headers = compressed_headers(headers)
                    if not self._head:
                        self._compressor = zlib.compressobj(self._level, zlib.DEFLATED, 31)
                message = {**message, "headers": headers}
        elif kind == "http.response.body" and self._compressor is not None:
            more = bool(message.get("more_body", False))
            data = self._compressor.compress(message.get("body", b""))
            if not more:
                data += self._compressor.flush()
                self._compressor = None
            self._held.append(data)
            self._held_size += len(data)
            if more and self._held_size < HOLD:
                return  # held for now; nothing to send yet
            data = b"".join(self._held)
            self._held, self._held_size = [], 0
            message = {"type": "http.response.body", "body": data, "more_body": more}
        await self._send(message)

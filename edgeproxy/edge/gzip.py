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
    """Whether an Accept-Encoding value names `gzip` with a q above 0 (`x-gzip` and `*` do
    not count, as in nginx)."""
    for item in accept_encoding.split(b","):
        coding, *params = item.split(b";")
        if coding.strip().lower() != b"gzip":
            continue
        for param in params:
            name, _, value = param.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    return float(value.strip() or b"x") > 0
                except ValueError:
                    return False
        return True
    return False


def client_wants_gzip(scope: Scope) -> bool:
    """The request side of the decision: HTTP/1.1+, gzip accepted, not an old MSIE."""
    if scope["http_version"] in ("0.9", "1.0"):
        return False
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    accept = b",".join(v for n, v in headers if n == b"accept-encoding")
    if not accepts_gzip(accept):
        return False
    agent = b" ".join(v for n, v in headers if n == b"user-agent")
    return DISABLE.search(agent) is None


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

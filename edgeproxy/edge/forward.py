"""The headers a backend receives, as the seed's `location /` block sets them (pure functions).

    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header Host              $http_host;
    proxy_set_header X-Real-IP         $remote_addr;

plus X-Forwarded-For appended (`$proxy_add_x_forwarded_for`: the issue asks for it; the seed's
nginx passes the client's unchanged), plus RFC 9110 section 7.6.1: a proxy removes the
hop-by-hop fields (Connection, the fields it names, Proxy-Connection, Keep-Alive, TE,
Transfer-Encoding, Upgrade) before forwarding (nginx keeps Proxy-Connection and the fields
Connection names). Header names nginx ignores (`ignore_invalid_headers on`,
`underscores_in_headers off`: anything but letters, digits and `-`, such as `X_Real_IP`) are
dropped as nginx drops them, so no backend mistakes one for the header it resembles.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade"}
)
# A client cannot have these removed by naming them in Connection: the backend needs them.
_NEVER_HOP_BY_HOP = frozenset({b"host", b"content-length", b"x-forwarded-for", b"x-real-ip"})
# Set by the edge itself: whatever the client sent is replaced.
_SET_BY_EDGE = frozenset({b"x-forwarded-proto", b"x-real-ip", b"x-forwarded-for"})
# The header names nginx accepts by default; it ignores any other.
_VALID_NAME = re.compile(rb"[A-Za-z0-9-]+")


def hop_by_hop_names(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The fixed hop-by-hop names plus every field named in a Connection header."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }
    return HOP_BY_HOP | (named - _NEVER_HOP_BY_HOP)


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """`headers` without the hop-by-hop fields (names compared case-insensitively)."""
    headers = list(headers)
    drop = hop_by_hop_names(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]


def valid_name(name: bytes) -> bool:
    """Whether nginx (with its defaults) takes a request header of this name into account."""
    return _VALID_NAME.fullmatch(name) is not None


def forwarded_headers(
    headers: Iterable[tuple[bytes, bytes]], scheme: str, client_ip: str | None
) -> Headers:
    """The request headers for the backend: Host kept, X-Forwarded-* set, hop-by-hop removed.

    `headers` are the client's (lower-case names, as an ASGI server gives them).
    """
    kept = [(name, value) for name, value in strip_hop_by_hop(headers) if valid_name(name)]
    prior = [value.strip() for name, value in kept if name == b"x-forwarded-for" and value.strip()]
    out = [(name, value) for name, value in kept if name not in _SET_BY_EDGE]
    out.append((b"x-forwarded-proto", scheme.encode("latin-1")))
    if client_ip:
        address = client_ip.encode("latin-1")
        out.append((b"x-real-ip", address))
        out.append((b"x-forwarded-for", b", ".join([*prior, address])))
    elif prior:
        out.append((b"x-forwarded-for", b", ".join(prior)))
    return out


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of `name` (lower-case) in ASGI headers, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None

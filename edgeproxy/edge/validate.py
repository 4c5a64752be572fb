"""nginx's checks of a request head that httptools makes differently or not at all (pure).

`request_line_status` follows nginx 1.22's request line parser (`ngx_http_parse_request_line`):
a method of `A-Z _ -`, a URI starting with `/` or `scheme://` with no space or control byte, and
`HTTP/major.minor` — 505 for a major version over 1, 400 for anything else malformed.
`head_status` follows its checks once the headers are read: HTTP/1.1 needs one Host, a
Transfer-Encoding other than chunked is 501, a path climbing above `/` is 400.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

_REQUEST_LINE = re.compile(
    rb"[A-Z_-]+ +(?P<uri>/[^\x00-\x20\x7f]*|[A-Za-z][A-Za-z0-9+.-]*://[^\x00-\x20\x7f]*)"
    rb"(?: +HTTP/(?P<major>[0-9]+)\.(?P<minor>[0-9]+))? *"
)


def request_line_status(line: bytes) -> int | None:
    """nginx's answer to a bad request line (without its CR LF): 400 or 505; None if good."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        return 400
    if match["major"] is None:
        return None  # HTTP/0.9: left to the HTTP parser
    # Past 99 before int(): it refuses more than 4300 digits, and a line may hold 32 KiB.
    if any(len(match[part].lstrip(b"0")) > 2 for part in ("major", "minor")):
        return 400
    major = int(match["major"])
    if major < 1:
        return 400
    return 505 if major > 1 else None


def head_status(http_version: str, headers: list[tuple[bytes, bytes]], path: bytes) -> int | None:
    """nginx's answer to a request whose head is complete but wrong (names lowercased)."""
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1 or (not hosts and http_version not in ("1.0", "0.9")):
        return 400
    for name, value in headers:
        if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            return 501
    return 400 if _climbs_above_root(path) else None


def _climbs_above_root(path: bytes) -> bool:
    """`/../x`, `/a/../../x`, `/%2e%2e/x`: nginx refuses a path leaving the root."""
    if b"." not in path and b"%" not in path:
        return False
    depth = 0
    for segment in unquote_to_bytes(path).split(b"/")[1:]:
        if segment == b"..":
            depth -= 1
            if depth < 0:
                return True
        elif segment not in (b"", b"."):
            depth += 1
    return False

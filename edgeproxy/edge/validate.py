"""nginx's checks of a request head that httptools makes differently or not at all (pure).

`request_line_status` follows nginx 1.22's request line parser (`ngx_http_parse_request_line`):
a method of `A-Z _ -`, a URI starting with `/` or `scheme://` with no space or control byte, and
`HTTP/major.minor` — 505 for a major version over 1, 400 for anything else malformed.
`head_status` follows its checks once the headers are read (`ngx_http_process_request_header`):
a path climbing above `/` is 400, HTTP/1.1 needs one Host and every Host must be a host name
(`ngx_http_validate_host`), a Transfer-Encoding is 400 before HTTP/1.1 or twice and 501 if not
chunked, TRACE and CONNECT are 405.
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


def head_status(
    http_version: str, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> int | None:
    """nginx's answer to a request whose head is complete but wrong (names lowercased), in
    nginx's order: the request line's path first, then the headers, the method last."""
    if _climbs_above_root(origin_form(target).partition(b"?")[0]):
        return 400
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1 or (not hosts and http_version not in ("1.0", "0.9")):
        return 400
    if not target.startswith(b"/"):  # the request line's host is checked as a Host is
        hosts.append(re.split(rb"[/?]", target.partition(b"://")[2], maxsplit=1)[0])
    if not all(_valid_host(host) for host in hosts):
        return 400
    encodings = [value for name, value in headers if name == b"transfer-encoding"]
    if encodings:
        if http_version in ("1.0", "0.9") or len(encodings) > 1:
            return 400  # request smuggling through a 1.0 hop, or a second framing
        # nginx trims spaces only: "chunked<TAB>" is not chunked (llhttp would read to the end)
        if encodings[0].rstrip(b" ").lower() != b"chunked":
            return 501
    return 405 if method in (b"TRACE", b"CONNECT") else None


def origin_form(target: bytes) -> bytes:
    """The path and query of a request target: `http://h/p?q` is `/p?q`, and `http://h` or
    `http://h?q` is `/` on that host for nginx (llhttp finds no path in them)."""
    if target.startswith(b"/"):
        return target
    authority = target.partition(b"://")[2]
    end = min((i for i in (authority.find(b"/"), authority.find(b"?")) if i >= 0), default=None)
    if end is None:
        return b"/"
    rest = authority[end:]
    return rest if rest.startswith(b"/") else b"/" + rest


def _valid_host(host: bytes) -> bool:
    """`ngx_http_validate_host`: no `/`, NUL, control byte or space, no `..`; a trailing dot
    and a port are allowed, and something must be left of the name."""
    dot, name_end, literal, rest = -2, len(host), False, False
    for i, byte in enumerate(host):
        if byte == 0x2E:  # .
            if dot == i - 1:
                return False
            dot = i
        elif byte == 0x3A:  # : ends the name (not inside [an IPv6 literal])
            if not literal and not rest:
                name_end, rest = i, True
        elif byte == 0x5B:  # [
            literal = literal or i == 0
        elif byte == 0x5D:  # ]
            if literal and not rest:
                name_end, rest = i + 1, True
        elif byte in (0x00, 0x2F) or byte <= 0x20 or byte == 0x7F:
            return False
    if dot == name_end - 1:
        name_end -= 1
    return name_end > 0


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

"""nginx's small error and redirect pages, with `server_tokens off` (no version)."""

from __future__ import annotations

from http import HTTPStatus

from starlette.types import Send

# nginx's own reason phrases where they differ from Python's.
_REASONS = {413: "Request Entity Too Large", 504: "Gateway Time-out"}


def reason(status: int) -> str:
    return _REASONS.get(status) or HTTPStatus(status).phrase


def page(status: int) -> bytes:
    """The body nginx sends for `status`, naming edgeproxy instead of nginx."""
    title = f"{status} {reason(status)}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>edgeproxy</center>\r\n"
        "</body>\r\n</html>\r\n"
    ).encode()


async def send_page(
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    head: bool = False,
    close: bool = False,
) -> None:
    """Send nginx's page for `status`; `close` asks the server to close the connection after."""
    body = page(status)
    out = [
        (b"content-type", b"text/html"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    if close:
        out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": b"" if head else body})

"""nginx's small error and redirect pages, with `server_tokens off` (no version)."""

from __future__ import annotations

from http import HTTPStatus

from starlette.types import Send

# nginx's own reason phrases where they differ from Python's.
_REASONS = {
    413: "Request Entity Too Large",
    405: "Not Allowed",
    414: "Request-URI Too Large",
    504: "Gateway Time-out",
}
# nginx's 494 page, sent with status 400 for a header or head over the header buffers.
HEADER_TOO_LARGE = "Request Header Or Cookie Too Large"
# nginx's 497 page, sent with status 400 for plain HTTP on the https port.
PLAIN_HTTP = "The plain HTTP request was sent to HTTPS port"


def reason(status: int) -> str:
    return _REASONS.get(status) or HTTPStatus(status).phrase


def page(status: int, detail: str = "") -> bytes:
    """The body nginx sends for `status`, naming edgeproxy instead of nginx; with `detail`
    (as for HEADER_TOO_LARGE), the detail is the title and a line under the heading."""
    heading = f"{status} {reason(status)}"
    title = f"{status} {detail}" if detail else heading
    extra = f"<center>{detail}</center>\r\n" if detail else ""
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{heading}</h1></center>\r\n{extra}<hr><center>edgeproxy</center>\r\n"
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

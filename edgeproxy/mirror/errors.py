"""Registry errors as values (an OCI code and a status) until they become a JSON response."""

from __future__ import annotations

import http.client
import json
import os
import ssl
from typing import Any

from starlette.responses import Response

# code -> HTTP status, as the distribution spec and registry:2 use them.
STATUS = {
    "BLOB_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "MANIFEST_INVALID": 400,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "TAG_INVALID": 400,
    "RANGE_INVALID": 416,
    "PAGINATION_NUMBER_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "UNKNOWN": 500,
    "UNAVAILABLE": 503,
}


class RegistryError(Exception):
    """An error the client sees as `{"errors": [{"code", "message", "detail"}]}`."""

    def __init__(
        self,
        code: str,
        message: str,
        detail: Any = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.status = status or STATUS[code]
        self.headers = headers or {}

    def response(self, head: bool = False) -> Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        body = json.dumps({"errors": [error]}).encode()
        headers = {**self.headers, "Content-Length": str(len(body))}
        return Response(
            b"" if head else body,
            status_code=self.status,
            headers=headers,
            media_type="application/json",
        )


def describe(exc: BaseException) -> str:
    """What failed, in words a client may read: the exception's type, and why, as registry:2
    passes Go's error on ("dial tcp: lookup registry-1.docker.io: no such host"). The words
    are the deepest OSError's under it (anyio's "All connection attempts failed" wraps the
    refusal), its errno's for a plain one (asyncio's words hold the address)."""
    if isinstance(exc, http.client.IncompleteRead):
        return "IncompleteRead"  # its repr holds the bytes read so far
    words = str(exc)
    cause: BaseException | None = exc
    seen: set[int] = set()  # a chain may loop (`raise a from b` where b came from a)
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            words = str(cause)
        elif isinstance(cause, OSError) and cause.errno is not None:
            words = os.strerror(cause.errno) if cause.errno > 0 else str(cause.strerror)
        cause = cause.__cause__ or cause.__context__
    words = " ".join(words.split())[:160]
    return f"{type(exc).__name__}: {words}" if words else type(exc).__name__

"""Registry errors as values (an OCI code and a status) until they become a JSON response."""

from __future__ import annotations

import json
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

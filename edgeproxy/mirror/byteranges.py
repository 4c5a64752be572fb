"""multipart/byteranges: the 206 for a Range of several spans, framed as Go's mime/multipart
writes it for registry:2's blob server (a part per span, in the order asked)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable

Read = Callable[[int, int], AsyncIterator[bytes | memoryview]]


class Byteranges:
    """The parts of `spans` of a body of `size` bytes whose own type is `content_type`."""

    def __init__(self, spans: list[tuple[int, int]], size: int, content_type: str) -> None:
        boundary = secrets.token_hex(30)  # Go's length: 60 characters
        self.content_type = f"multipart/byteranges; boundary={boundary}"
        self._spans = spans
        self._heads = [
            (
                f"--{boundary}\r\n"
                f"Content-Range: bytes {start}-{end - 1}/{size}\r\n"
                f"Content-Type: {content_type}\r\n\r\n"
            ).encode()
            for start, end in spans
        ]
        self._heads[1:] = [b"\r\n" + head for head in self._heads[1:]]  # after a part's bytes
        self._tail = f"\r\n--{boundary}--\r\n".encode()
        framing = sum(map(len, self._heads)) + len(self._tail)
        self.length = framing + sum(end - start for start, end in spans)

    async def body(self, read: Read) -> AsyncIterator[bytes | memoryview]:
        """The whole multipart body, each span's bytes from `read(start, end)`."""
        for head, (start, end) in zip(self._heads, self._spans, strict=True):
            yield head
            async for chunk in read(start, end):
                yield chunk
        yield self._tail

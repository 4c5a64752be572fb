"""nginx's request head limits (`client_header_buffer_size 32k; large_client_header_buffers
4 32k;`), as a meter fed the bytes of a request head as they arrive.

nginx reads the head into one 32 KiB buffer; when a line does not fit in what is left, the
line so far moves to one of 4 more 32 KiB buffers. A line that cannot fit in one buffer is too
long: 414 for the request line, 400 "Request Header Or Cookie Too Large" for a header; a head
needing a fifth large buffer is too large: 400 likewise. So a line may be up to 32 KiB, and a
head up to 160 KiB less what the moved lines leave unused. (At the exact boundary where a
buffer ends on a line's end, nginx wastes a line more: edgeproxy may accept a few bytes more.)
More than 1000 header lines are too many: 400 likewise.
"""

from __future__ import annotations

BUFFER = 32 * 1024  # client_header_buffer_size
LARGE_BUFFER = 32 * 1024  # large_client_header_buffers 4 32k
LARGE_BUFFERS = 4
MAX_HEADERS = 1000  # header lines nginx takes (1.22 as Debian ships it); 400 past them


class HeadTooLarge(Exception):
    """The head broke a limit: `status` is nginx's answer (414 or 400)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class HeadMeter:
    """Follows one request head through nginx's buffers; `feed` raises HeadTooLarge."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Ready for the next request's head."""
        self.active = True
        self.begun = False  # a byte of this request arrived
        self.head = bytearray()  # this head's bytes so far (the buffers bound it)
        self.request_line_done = False
        # Where the request line ends in the data last fed (its LF), if it ended there.
        self.line_end: int | None = None
        self._request_line = True
        self._size = BUFFER  # the buffer the current line is in
        self._start = 0  # where the current line starts in it
        self._line = 0  # bytes of the current line so far, its LF included once seen
        self._large = 0  # large buffers taken
        self._headers = 0  # header lines

    def feed(self, data: bytes) -> None:
        """Meter `data`, the next bytes of the connection; once the head's blank line is seen,
        the rest (the body, or a pipelined request) is not this head's and `active` is False."""
        position = 0
        self.line_end = None
        while self.active and position < len(data):
            end = data.find(b"\n", position)
            complete = end >= 0
            stop = end + 1 if complete else len(data)
            self.begun = True
            self.head += data[position:stop]
            self._line += stop - position
            position = stop
            self._check()
            if complete:
                if self._request_line and self._line > 2:
                    self.line_end = end
                self._line_done()

    @property
    def request_line(self) -> bytes:
        """The request line as received so far (up to a CR or LF): nginx's $request."""
        end = self.head.find(b"\n", 0, BUFFER)  # nginx logs what its buffer holds
        return bytes(self.head[: end if end >= 0 else BUFFER]).partition(b"\r")[0]

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The header lines received whole so far (names lowercased), for the log."""
        lines = bytes(self.head).split(b"\n")[1:-1]  # the last one is not whole
        fields = (line.rstrip(b"\r").partition(b":") for line in lines)
        return [(name.strip().lower(), value.strip()) for name, colon, value in fields if colon]

    def _check(self) -> None:
        if self._start + self._line <= self._size:
            return
        status = 414 if self._request_line else 400
        if self._size - self._start >= LARGE_BUFFER or self._line > LARGE_BUFFER:
            raise HeadTooLarge(status)  # the line alone fills a buffer
        if self._large == LARGE_BUFFERS:
            raise HeadTooLarge(400)
        self._large += 1  # the line so far moves to a new large buffer
        self._size, self._start = LARGE_BUFFER, 0

    def _line_done(self) -> None:
        blank = self._line <= 2  # "\r\n" or "\n"
        if self._request_line and blank:
            self._line = 0  # empty lines before a request line are skipped, as nginx does
            self.head.clear()
            return
        if self._request_line:
            self.request_line_done = True
        if blank:
            self.active = False  # the head is complete
            return
        if not self._request_line:
            self._headers += 1
            if self._headers > MAX_HEADERS:
                raise HeadTooLarge(400)
        self._request_line = False
        self._start += self._line
        self._line = 0

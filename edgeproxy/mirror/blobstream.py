"""A blob GET from the upstream, run by a thread of its own (stdlib http.client).

On a cold fetch the event loop's thread is the busiest one: it also serves every client. An
asyncio HTTP client costs it a socket read into a buffer of the loop's, the parser's copy of
the body and the join into 1 MiB blocks. Here a thread reads the socket straight into the
block that is then hashed, written and served: one copy, off the loop (bench/README.md).
The thread opens the connection too, so a slow upstream never holds the loop's executor.
Connections are kept alive between blobs (`ConnectionPool`): a pull of many small layers does
not pay a TCP and a TLS handshake per layer, two with a redirect to a CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import http.client
import re
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import Message

from httpx import InvalidURL

from edgeproxy.mirror.errors import describe
from edgeproxy.mirror.proxies import Proxies, Proxy
from edgeproxy.mirror.tlsintls import TLSInTLS

MAX_REDIRECTS = 5
MAX_IDLE = 8  # idle connections kept per origin
IDLE_TIMEOUT = 30.0  # seconds; older idle ones are dropped (servers close them too)
MAX_REDIRECT_BODY = 64 * 1024  # a redirect's body is read (and dropped) to reuse its connection
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_GZIP = ("gzip", "x-gzip")  # the content codings decoded (Go's transport decodes gzip only)
_WHOLE_RANGE = re.compile(r"bytes 0-(\d{1,19})/(\d{1,19})", re.ASCII)
# What the blocks of a process's streams take together, one block each (a fill holds a few
# more: read ahead, being hashed and written, being sent): past 64 streams at once each reads
# into smaller ones, down to MIN_BLOCK. 300 cold blobs at once behind a 1 Gbit/s link held
# 620-1140 MiB in 1 MiB blocks; smaller blocks cost the loop more CPU a byte, and 64 streams
# at once keep 1 MiB (bench/README.md).
BLOCKS = 64 * 1024 * 1024
MIN_BLOCK = 128 * 1024

Origin = tuple[str, str]  # (scheme, host[:port])


class _Reading:
    """How many streams of the process read a body at once: each one's share of BLOCKS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.streams = 0

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        with self._lock:
            self.streams += 1
        try:
            yield
        finally:
            with self._lock:
                self.streams -= 1

    def block_size(self, largest: int) -> int:
        """The block a stream reads into next: `largest`, or its share of BLOCKS (a power
        of two, MIN_BLOCK at least) with many streams at once. Few sizes: malloc reuses a
        freed block for the next one (any size in between cost 30-40 MiB more RSS)."""
        share = BLOCKS // max(1, self.streams)
        return min(largest, max(MIN_BLOCK, 1 << (share.bit_length() - 1)))


_reading = _Reading()


class BlobStreamError(Exception):
    """The upstream connection failed: refused, timed out, cut short, or not HTTP."""


class ConnectionPool:
    """Idle keep-alive connections by origin, shared by one upstream's blob threads."""

    def __init__(
        self,
        context: ssl.SSLContext,
        connect_timeout: float,
        read_timeout: float,
        proxies: Proxies | None = None,
    ) -> None:
        """`context`: the upstream's TLS, an https:// proxy's too (as Go's transport, with
        its one RootCAs). `proxies`: the upstream's (its httpx client's); None connects direct."""
        self._context = context
        self._proxies = proxies
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._lock = threading.Lock()
        self._idle: dict[Origin, list[tuple[http.client.HTTPConnection, float]]] = {}

    def connect(
        self, origin: Origin, reuse: bool = True
    ) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection to `origin` if there is one (and `reuse`), else a new one; and
        whether it was reused (a reused one may have been closed by the server meanwhile)."""
        if reuse:
            with self._lock:
                idle = self._idle.get(origin, [])
                while idle:
                    connection, since = idle.pop()
                    if time.monotonic() - since < IDLE_TIMEOUT:
                        return connection, True
                    connection.close()
        return self._new(origin), False

    def _new(self, origin: Origin) -> http.client.HTTPConnection:
        scheme, netloc = origin
        proxy = self._proxies.choose(scheme, netloc) if self._proxies else None
        connection: http.client.HTTPConnection
        if scheme == "https" and proxy and proxy.tls:
            connection = _TunnelInTLS(proxy, netloc, self._context, self._connect_timeout)
        elif scheme == "https":
            connection = http.client.HTTPSConnection(
                proxy.netloc if proxy else netloc,
                timeout=self._connect_timeout,
                context=self._context,
            )
            if proxy:
                connection.set_tunnel(netloc, headers=proxy.headers)  # CONNECT, then TLS
        elif proxy:
            connection = _ForwardedConnection(proxy, netloc, self._context, self._connect_timeout)
        else:
            connection = http.client.HTTPConnection(netloc, timeout=self._connect_timeout)
        try:
            connection.connect()
            assert connection.sock is not None
            connection.sock.settimeout(self._read_timeout)
        except OSError as exc:
            connection.close()
            if proxy:  # say which way failed: a proxy's refusal is its status line
                raise BlobStreamError(f"through the proxy: {str(exc)[:120]}") from None
            raise
        except BaseException:
            connection.close()
            raise
        return connection

    def release(self, origin: Origin, connection: http.client.HTTPConnection) -> None:
        """Keep a connection whose last response was read to its end."""
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < MAX_IDLE:
                idle.append((connection, time.monotonic()))
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection, _ in connections:
                connection.close()


class _ForwardedConnection(http.client.HTTPConnection):
    """Plain HTTP through a proxy: each request names its absolute URL (RFC 9112 3.2.2) and
    carries the proxy's credentials; in TLS with an https:// proxy, checked with `context`."""

    def __init__(self, proxy: Proxy, netloc: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(proxy.netloc, timeout=timeout)
        self._base = f"http://{netloc}"
        self._proxy_headers = proxy.headers
        if proxy.tls:
            self._create_connection = functools.partial(_connect_tls, context, proxy.host)

    def putrequest(
        self, method: str, url: str, skip_host: bool = False, skip_accept_encoding: bool = False
    ) -> None:
        super().putrequest(method, self._base + url, skip_host, skip_accept_encoding)
        for name, value in self._proxy_headers.items():
            self.putheader(name, value)


class _TunnelInTLS(http.client.HTTPConnection):
    """HTTPS through an https:// proxy: TLS with the proxy, CONNECT, then TLS with the upstream
    inside the proxy's (`TLSInTLS`); both certificates checked with `context`."""

    def __init__(self, proxy: Proxy, netloc: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(proxy.netloc, timeout=timeout)
        self.set_tunnel(netloc, headers=proxy.headers)
        self._create_connection = functools.partial(_connect_tls, context, proxy.host)
        self._context = context
        self._server_hostname = urllib.parse.urlsplit(f"//{netloc}").hostname or ""

    def connect(self) -> None:
        super().connect()  # TLS with the proxy (_create_connection), then CONNECT
        assert self.sock is not None
        self.sock = TLSInTLS(self.sock, self._context, self._server_hostname)


def _connect_tls(
    context: ssl.SSLContext,
    server_hostname: str,
    address: tuple[str, int],
    timeout: float | None,
    source_address: tuple[str, int] | None = None,
) -> ssl.SSLSocket:
    """socket.create_connection, then TLS with `server_hostname` (an https:// proxy)."""
    sock = socket.create_connection(address, timeout, source_address)
    try:
        return context.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise


@dataclass(frozen=True)
class BlobRequest:
    url: str
    headers: dict[str, str]
    pool: ConnectionPool


class BlobStream:
    """One GET: `await open()` for the status and headers, then `blocks()` for the body.

    The thread reads at most `ahead` blocks beyond those the loop has taken (4 cost 7-15 MB
    more peak RSS per worker with 8 clients than 2, for no measurable speed). `close()` stops
    it (a read in progress is cut by shutting the socket down) and must always be called.
    """

    def __init__(self, request: BlobRequest, block_size: int, ahead: int = 2) -> None:
        self._request = request
        self._block_size = block_size
        self._room = threading.Semaphore(ahead)
        self._stop = threading.Event()
        self._connection: http.client.HTTPConnection | None = None
        self._origin: Origin = _origin(request.url)
        self._response: http.client.HTTPResponse | None = None
        self._body: http.client.HTTPResponse | gzip.GzipFile | None = None  # decoded
        self._length: int | None = None  # the response's, kept: http.client counts it down
        self._arrived: asyncio.Queue[bytearray | BaseException | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="edgeproxy-blob", daemon=True)

    @property
    def status(self) -> int:
        assert self._response is not None, "open() first"
        return self._response.status

    @property
    def headers(self) -> Message:
        assert self._response is not None, "open() first"
        return self._response.headers

    @property
    def content_length(self) -> int | None:
        return self._length

    @property
    def whole(self) -> bool:
        """Whether the answer is the whole blob: a 200, or a 206 whose Content-Range covers
        it all (a CDN's caching layer may send one unasked; registry:2 takes it too)."""
        if self.status == 206:
            span = _WHOLE_RANGE.fullmatch(self.headers.get("Content-Range", "").strip())
            return span is not None and int(span[1]) + 1 == int(span[2])
        return self.status == 200

    @property
    def redirected(self) -> bool:
        """Whether the answer came from another origin (a CDN the upstream sent us to)."""
        return self._origin != _origin(self._request.url)

    async def open(self) -> None:
        """Connect, send the request, follow redirects; raises BlobStreamError."""
        self._thread.start()
        head = await self._arrived.get()
        if isinstance(head, BaseException):
            raise head

    async def blocks(self) -> AsyncIterator[bytearray]:
        """The body in blocks of `block_size` bytes (the last one shorter), or of this
        stream's share of BLOCKS while many streams read at once."""
        while True:
            item = await self._arrived.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            self._room.release()
            yield item

    def close(self) -> None:
        self._stop.set()
        self._room.release()
        connection = self._connection
        if connection is not None and connection.sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile by the thread
                connection.sock.shutdown(socket.SHUT_RDWR)
        if self._thread.ident is None:
            self._close_connection()  # never started

    # The thread
    def _run(self) -> None:
        try:
            self._open()
            self._post(None)  # the head is in
            if not self.whole:
                return
            with _reading.one():
                while True:
                    self._room.acquire()
                    if self._stop.is_set():
                        return
                    size = _reading.block_size(self._block_size)
                    block = self._read_block(size)
                    if len(block) < size:
                        self._keep_alive()
                    self._post(block)
                    if not block:
                        return
        except (OSError, http.client.HTTPException, zlib.error, EOFError) as exc:
            if not self._stop.is_set():
                self._post(BlobStreamError(describe(exc)))
        except BaseException as exc:  # pragma: no cover - a bug: let the loop see it
            self._post(exc)
        finally:
            self._close_connection()

    def _open(self) -> None:
        try:
            self._follow()
        # A redirect to a URL no request can go to: it does not parse ("http://[::1"), its
        # host is no IDNA name, its port is past 65535, its path has bytes http.client
        # refuses. The upstream's fault, as one that cannot be reached.
        except (ValueError, OverflowError, InvalidURL) as exc:
            raise BlobStreamError(f"a redirect to an unusable URL: {type(exc).__name__}") from None
        assert self._response is not None
        self._body = self._response
        # http.client says Accept-Encoding: identity. A CDN or proxy that gzips all the same:
        # the blob is what that decodes to, as Go's transport (registry:2's) reads it.
        if self._response.headers.get("Content-Encoding", "").strip().lower() in _GZIP:
            self._body = gzip.GzipFile(fileobj=self._response, mode="rb")
            self._length = None  # the coded length, not the blob's

    def _follow(self) -> None:
        request = self._request
        url = request.url
        first = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            self._origin = _origin(url)
            # Credentials go to the upstream's own origin only, never to a redirect's CDN.
            headers = request.headers if self._origin == first else {}
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            self._exchange(path, headers)
            assert self._response is not None
            location = self._response.headers.get("Location")
            if self._response.status not in _REDIRECTS or not location:
                return
            length = self._response.length
            if length is not None and length <= MAX_REDIRECT_BODY:
                self._response.read()
                self._keep_alive()
            self._close_connection()
            url = urllib.parse.urljoin(url, location)
            scheme = urllib.parse.urlsplit(url).scheme
            if scheme not in ("http", "https"):
                raise BlobStreamError(f"a redirect to {scheme[:16]}: not followed")
        raise BlobStreamError(f"more than {MAX_REDIRECTS} redirects")

    def _exchange(self, path: str, headers: dict[str, str]) -> None:
        """Send the GET and read the head, on a kept-alive connection if there is one; one
        that the server closed meanwhile is replaced by a new one (a GET is safe to resend)."""
        pool = self._request.pool
        self._connection, reused = pool.connect(self._origin)
        try:
            self._connection.request("GET", path, headers=headers)
            self._response = self._connection.getresponse()
        except (OSError, http.client.HTTPException):
            self._connection.close()
            if not reused:
                raise
            self._connection, _ = pool.connect(self._origin, reuse=False)
            self._connection.request("GET", path, headers=headers)
            self._response = self._connection.getresponse()
        self._length = self._response.length

    def _keep_alive(self) -> None:
        """Hand a connection whose response was read to its end back to the pool."""
        response, connection = self._response, self._connection
        if (
            connection is not None
            and response is not None
            and response.isclosed()
            and not response.will_close
            and response.length in (0, None)  # not cut short (chunked ends raise instead)
            and not self._stop.is_set()
        ):
            self._request.pool.release(self._origin, connection)
            self._connection = None

    def _read_block(self, size: int) -> bytearray:
        assert self._body is not None
        block = bytearray(size)
        with memoryview(block) as view:
            filled = 0
            while filled < len(block):
                count = self._body.readinto(view[filled:])
                if not count:
                    break
                filled += count
        del block[filled:]
        return block

    def _post(self, item: bytearray | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._arrived.put_nowait, item)

    def _close_connection(self) -> None:
        if self._response is not None:
            self._response.close()
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _origin(url: str) -> Origin:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()

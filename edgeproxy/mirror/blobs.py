"""Blobs: warm hits read from storage in 1 MiB pieces; a cold blob is filled once.

A fill is a task of its own (a client that disconnects never aborts it). It streams the
upstream body into a `PartialBlob`, hashing as it writes, and commits only when the digest
matches. Every client of a cold blob, the first included, reads the growing spool file; the
last byte (of the blob, or of the range asked) is held back until the digest matched, so
nobody is ever served a wrong blob whole, nor a wrong range.
When another process holds the fill (workers share the root), this process follows that
fill's spool file instead of fetching again.

A blob is served only through a repository the upstream gave it in: the one whose GET
fetched it, or one the upstream confirmed with a HEAD. registry:2 serves its cache only
through repositories that link a blob; a name that merely knows a digest gets nothing.

When the spool cannot be written (the disk is full: ENOSPC, or any other write error), or
not even begun (a read-only cache: EROFS), the fill goes on without it: the blob is streamed
to the clients already reading it, still verified, and not cached; the slowest of them then
sets the pace of the upstream read, so that the memory window stays bounded. The spool and
its lock go at once: nobody else waits on a fill that caches nothing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from edgeproxy import metrics
from edgeproxy.mirror.blobstream import BlobStreamError
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.eviction import Evictor
from edgeproxy.mirror.names import Target
from edgeproxy.mirror.shared import SharedCalls
from edgeproxy.mirror.storage import BlobReader, PartialBlob, Storage
from edgeproxy.mirror.upstream import (
    UpstreamClient,
    UpstreamResponse,
    UpstreamUnavailable,
    is_refusal,
)

log = logging.getLogger("edgeproxy.blobs")

CHUNK = 1024 * 1024  # 1 MiB: 64 KiB pieces cost 5x the CPU on the blob path
# A warm read's pieces: plain HTTP sends 1 MiB pieces at about 1.3x the MB/s of 256 KiB ones.
# Over TLS each piece is held twice more (ciphertext, the TLS buffer) while a slow client drains
# it, and 256 KiB pieces send as fast as 1 MiB ones: about 3 MiB a client at the peak, not 4.5.
READ_CHUNK = {"http": CHUNK, "https": 256 * 1024}
MAX_UNWRITTEN = 8 * CHUNK  # read ahead of the disk by at most this much
WINDOW = 8 * CHUNK  # the newest received bytes, kept for this process's readers
# What the windows of every fill of a process keep at most, together: a client asking for
# many cold blobs at once must not hold 8 MiB in memory for each.
WINDOWS = 8 * WINDOW
# (repository, digest) pairs whose layer link the disk refused, remembered at most: past it,
# they are forgotten (those repositories ask the upstream to confirm the blob again).
MAX_UNLINKED = 100_000
FOLLOW_POLL = 0.003  # seconds between looks at another process's fill
UNREAD_TIMEOUT = 60.0  # seconds a fill without its spool waits for a reader before giving up
# The threads that hash and write the blocks of every fill of a process: a fill needs two
# (its hashing and its writing overlap); more than the cores is for writes that wait on disk.
FILL_THREADS = 8


class Windows:
    """The bytes the fills of one process keep in their windows, and how many they may."""

    def __init__(self, budget: int = WINDOWS) -> None:
        self.budget = budget
        self.bytes = 0

    @property
    def over(self) -> bool:
        return self.bytes > self.budget


class InOrder:
    """Calls run one after another, in the order given, on threads shared with other
    `InOrder`s: a fill's hash updates and writes keep their order without threads of their
    own. Those were started and joined on the event loop, which waited for each: with many
    cold blobs at once, over a quarter of its time (bench/README.md)."""

    def __init__(self, pool: concurrent.futures.Executor) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._calls: collections.deque[tuple[concurrent.futures.Future[None], Callable[[], None]]]
        self._calls = collections.deque()
        self._running = False

    def submit(self, call: Callable[[], None]) -> asyncio.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._calls.append((future, call))
            idle, self._running = not self._running, True
        if idle:
            self._pool.submit(self._run)
        return asyncio.wrap_future(future)

    async def finished(self) -> None:
        """Once every call given so far has run, or was cancelled before it ran (a call
        whose waiter was cancelled may still be running)."""
        await asyncio.shield(self.submit(_nothing))

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    self._running = False
                    return
                future, call = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    call()
                except BaseException as exc:  # the waiter's, as concurrent.futures does
                    future.set_exception(exc)
                else:
                    future.set_result(None)


def _nothing() -> None:
    pass


class Fill:
    """The progress of one cold blob, as its readers in this process see it.

    `received` bytes came from the upstream; the newest of them stay in a memory window
    (readers that keep up never touch the disk), the older ones are `written` to the spool
    file. A window is for readers: a fill without any keeps only what is not on disk yet, as
    does one while the windows of all fills (`windows`) are over their budget. A fill followed
    in another process has no window: received = written. Once `spooling` is False nothing
    more is written: a block leaves the window only when every reader is past it.
    """

    def __init__(self, digest: str, name: str, windows: Windows | None = None) -> None:
        self.digest = digest
        # The repositories it is for: the one it started for (its GET asks there), and those
        # the upstream confirmed meanwhile. All are linked when it commits.
        self.names = {name}
        self.asked_in = name
        self.size: int | None = None
        self.received = 0
        self.written = 0
        self.verified = False  # the digest matched: every byte may go out
        self.committed = False
        self.spooling = True
        self.spool_error: OSError | None = None  # why it stopped spooling
        self.spool_dropped = False  # its path is no longer this fill's: never open it again
        self.error: RegistryError | None = None
        self.started = asyncio.Event()  # the size is known, or the fill failed
        self._window: collections.deque[tuple[int, bytearray]] = collections.deque()
        self._window_bytes = 0
        self._windows = windows or Windows()
        self._readers: dict[object, int] = {}  # reader -> its position
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None

    def receive(self, block: bytearray) -> None:
        self._window.append((self.received, block))
        self._window_bytes += len(block)
        self._windows.bytes += len(block)
        self.received += len(block)
        self._trim()
        self._notify()

    def advance(self, written: int) -> None:
        self.written = written
        if not self._window:  # following another process: what is on disk is all there is
            self.received = written
        self._trim()
        self._notify()

    def in_memory(self, position: int, limit: int) -> memoryview | None:
        """Bytes from `position` (up to `limit`) held in the window, None if not held."""
        for start, block in self._window:
            if start <= position < start + len(block):
                return memoryview(block)[position - start : min(limit - start, len(block))]
        return None

    def _trim(self) -> None:
        """Forget the oldest blocks once kept elsewhere (on disk, or read by every reader)
        and beyond the window (all of them when no reader here needs them, or while the
        windows of all fills are over their budget)."""
        while self._window and (
            self._window_bytes > WINDOW or not self._readers or self._windows.over
        ):
            start, block = self._window[0]
            if start + len(block) > self._kept_up_to():
                break
            self._window.popleft()
            self._window_bytes -= len(block)
            self._windows.bytes -= len(block)

    def _forget_window(self) -> None:
        self._windows.bytes -= self._window_bytes
        self._window.clear()
        self._window_bytes = 0

    def _kept_up_to(self) -> int:
        if self.spooling or not self._readers:
            return self.written
        return max(self.written, min(self._readers.values()))

    def unread(self) -> int:
        """Bytes received that exist only in the window and some reader still needs."""
        return self.received - self._kept_up_to()

    @property
    def has_readers(self) -> bool:
        return bool(self._readers)

    def stop_spooling(self, error: OSError) -> None:
        self.spooling = False
        self.spool_error = error

    def reader_at(self, reader: object, position: int | None) -> None:
        """A reader's progress (None: it is gone); only a fill without its spool waits for it."""
        if position is None:
            self._readers.pop(reader, None)
            self._trim()  # the window may have been its alone
        else:
            self._readers[reader] = position
        if not self.spooling:
            self._trim()
            self._notify()

    def start(self, size: int | None) -> None:
        self.size = size
        self.started.set()
        self._notify()

    def verify(self) -> None:
        self.verified = True
        self._notify()

    def commit(self) -> None:
        self.verified = self.committed = True
        self._forget_window()
        self.started.set()
        self._notify()

    def fail(self, error: RegistryError) -> None:
        self.error = error
        self._forget_window()
        self.started.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class BlobService:
    def __init__(self, storage: Storage, evictor: Evictor | None = None) -> None:
        self._storage = storage
        self._evictor = evictor  # told of commits and of a full disk: it may pass early
        self._fills: dict[str, Fill] = {}
        self._windows = Windows()  # shared by every fill of this process
        self._threads = ThreadPoolExecutor(FILL_THREADS, "edgeproxy-fill")
        self._tasks: set[asyncio.Task[None]] = set()
        self._heads: SharedCalls[tuple[str, str, str], UpstreamResponse] = SharedCalls()
        # Blobs the upstream gave in a repository whose link the disk refused (it was full):
        # linked when next asked for there (never confirmed again), once the disk took
        # another blob (the other workers know nothing of them), or when this process stops.
        self._unlinked: set[tuple[str, str]] = set()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._threads.shutdown(wait=False)
        # The links the disk refused are known to this process only: a restart would lose
        # them (those repositories would ask the upstream first), so write them now if the
        # disk has room again.
        self._relink()

    # Which repository may have a blob
    def needs_confirming(self, name: str, digest: str) -> bool:
        """Whether `digest` is held here (stored, or being filled) but was never given in
        repository `name`: the upstream must confirm it there first."""
        fill = self._fills.get(digest)
        if fill is not None and not fill.committed:
            return name not in fill.names
        if self._storage.blob_size(digest) is None or self._storage.blob_linked(name, digest):
            return False
        if (name, digest) in self._unlinked:  # given there: the link is all that is missing
            self._link([name], digest)
            return False
        return True

    async def confirm(self, upstream: UpstreamClient, target: Target, digest: str) -> int | None:
        """The upstream's HEAD of the blob in `target`'s repository (one for concurrent
        callers): its length, or its error raised. A blob held here is then linked there (at
        its fill's commit if it is still filling). Never downloads the blob."""
        head = await self._heads.run(
            (upstream.name, target.remote_name, digest),
            lambda: upstream.request(
                "HEAD", f"/v2/{target.remote_name}/blobs/{digest}", target.remote_name
            ),
        )
        if head.status != 200:
            raise upstream.error(head.status, "BLOB_UNKNOWN", head.headers.get("retry-after"))
        fill = self._fills.get(digest)
        if fill is not None and not fill.committed:
            fill.names.add(target.local_name)
        elif self._storage.blob_size(digest) is not None:
            self._link([target.local_name], digest)
        length = head.headers.get("content-length")
        return int(length) if length and length.isdigit() else None

    def _link(self, names: Iterable[str], digest: str) -> None:
        for name in names:
            try:
                self._storage.link_blob(name, digest)
            except OSError as exc:  # the blob is safe; the next request here links it again
                log.warning("no layer link for %s in %s: %s", digest, name, exc)
                self._write_failed(exc)
                if len(self._unlinked) >= MAX_UNLINKED:
                    self._unlinked.clear()
                self._unlinked.add((name, digest))
            else:
                self._unlinked.discard((name, digest))

    def _relink(self) -> None:
        """Write the links the disk refused: it took a blob since, or this process stops."""
        for name, digest in list(self._unlinked):
            if self._storage.blob_size(digest) is None:  # evicted since: nothing to link
                self._unlinked.discard((name, digest))
                continue
            self._link([name], digest)
            if (name, digest) in self._unlinked:  # refused again
                return

    def _write_failed(self, error: OSError) -> None:
        if self._evictor is not None:  # a full disk need not wait for the next pass
            self._evictor.write_failed(error)

    # Warm
    def size(self, digest: str) -> int | None:
        return self._storage.blob_size(digest)

    def open_stored(self, digest: str) -> BlobReader | None:
        """An open committed blob, None when it is not cached. Opened before the response
        starts: an eviction that removes the blob meanwhile cannot cut the body short."""
        try:
            return self._storage.open_blob(digest)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # out of descriptors, a failing disk: not the client's fault
            log.error("cannot open %s: %s", digest, exc)
            reason = f"the cache cannot be read: {exc.strerror or exc}"
            raise RegistryError("UNAVAILABLE", reason, status=503) from exc

    async def read_stored(
        self, reader: BlobReader, scheme: str, start: int, end: int
    ) -> AsyncIterator[bytes | memoryview]:
        """Bytes [start, end) of an open blob, sent over `scheme`: from the page cache on the
        event loop, else read in a thread (the disk may be cold). The caller closes `reader`:
        one answer may read several spans of it."""
        piece = READ_CHUNK.get(scheme, CHUNK)
        position = start
        while position < end:
            length = min(piece, end - position)
            chunk = reader.read_cached(position, length)
            if chunk is None:
                chunk = await asyncio.to_thread(reader.read, position, length)
            else:
                # A fast client never makes the send wait: give the other connections a turn.
                await asyncio.sleep(0)
            if not chunk:
                raise OSError("a cached blob is shorter than its size")
            position += len(chunk)
            yield chunk
            # Sent, the empty piece waits in uvicorn's send() until the client took this
            # one: a stalled client holds one piece, not two (1.09 MiB, not 2.06).
            yield b""

    # Cold
    async def fill(self, upstream: UpstreamClient, target: Target, digest: str) -> Fill:
        """The running fill of `digest`, started if needed; returns once its size is known.
        A fill the upstream refused in the repository it asked in (a 4xx: 404, 401, 403, a
        project's policy) fails only there: a client of another repository then starts a fill
        of its own. A rate limit (429), a timeout or a proxy's 407 fail every client."""
        for attempt in range(3):  # other repositories' refused fills, then this one's own
            fill = self._fills.get(digest)
            if fill is None:
                fill = self._fills[digest] = Fill(digest, target.local_name, self._windows)
                task = asyncio.create_task(self._run(fill, upstream, target))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await fill.started.wait()
            if fill.error is None:
                return fill
            if (
                not is_refusal(fill.error.status)
                or fill.asked_in == target.local_name
                or attempt == 2
            ):
                raise fill.error
        raise AssertionError("unreachable")  # pragma: no cover

    async def read_fill(
        self, fill: Fill, start: int, end: int | None
    ) -> AsyncIterator[bytes | memoryview]:
        """Bytes [start, end) of a fill as they arrive; ends early if the fill fails."""
        # Open now: the open file is read on after the commit renames it, or an eviction
        # removes it (a reader opened later would find nothing); a fill that committed
        # before this reader came is read from the cache.
        reader = self._open_spool(fill) or self.open_stored(fill.digest)
        position = start
        me = object()
        fill.reader_at(me, position)
        held: bytes | None = None  # a range's last byte, until the digest matched
        try:
            while end is None or position < end:
                # The final byte waits for the digest check: no client holds a whole wrong blob.
                limit = fill.received if fill.verified else fill.received - 1
                if end is not None:
                    limit = min(limit, end)
                if position < limit:
                    chunk: bytes | memoryview | None = fill.in_memory(position, limit)
                    if chunk is None:  # fallen behind the window: the bytes are on disk
                        # Never past what the spool holds for sure: a failed spool may hold
                        # misplaced bytes beyond it.
                        on_disk = min(CHUNK, limit - position, fill.written - position)
                        chunk = reader.read(position, on_disk) if reader and on_disk > 0 else b""
                        if not chunk and on_disk > 0:
                            # The spool opened was another's, whose fill failed before its
                            # first byte (then this fill took over: nothing was read of it).
                            if reader is not None:
                                reader.close()
                            reader = self._open_spool(fill)
                            chunk = reader.read(position, on_disk) if reader else b""
                        if not chunk:
                            raise RegistryError("BLOB_UNKNOWN", "the fill was replaced")
                    position += len(chunk)
                    if position == end and not fill.verified:
                        # A range's last byte too: no client holds a whole wrong range (a
                        # client of a 206 cannot check the digest itself).
                        chunk, held = chunk[:-1], bytes(chunk[-1:])
                    yield chunk
                    fill.reader_at(me, position)
                    yield b""  # as in read_stored: a stalled client holds one piece
                elif fill.error is not None:
                    raise fill.error
                elif fill.verified:
                    return
                else:
                    await fill.changed()
            if held is not None:
                fill.reader_at(me, None)  # nothing more to read: a fill that paces waits not
                while not fill.verified:
                    if fill.error is not None:
                        raise fill.error
                    await fill.changed()
                yield held
        finally:
            fill.reader_at(me, None)
            if reader is not None:
                reader.close()

    def _open_spool(self, fill: Fill) -> BlobReader | None:
        """The fill's spool (or the blob it became); none once a failed spool was dropped:
        its path may be the next fill's by now, with another download's bytes."""
        return None if fill.spool_dropped else self._storage.open_partial(fill.digest)

    async def _run(self, fill: Fill, upstream: UpstreamClient, target: Target) -> None:
        try:
            asked = False
            while not fill.done:
                size = self._storage.blob_size(fill.digest)
                if size is None and await self._download(fill, upstream, target):
                    return
                if not asked:  # another process fetches it: ask in our repository, as our GET
                    await self.confirm(upstream, target, fill.digest)
                    asked = True
                if size is None:
                    await self._follow(fill)
                else:  # committed by another process
                    fill.advance(size)
                    fill.start(size)
                    self._link(fill.names, fill.digest)
                    fill.commit()
        except RegistryError as exc:
            fill.fail(exc)
        except Exception as exc:
            log.exception("fill of %s failed", fill.digest)
            fill.fail(RegistryError("UNKNOWN", f"fill failed: {type(exc).__name__}"))
        finally:
            self._forget(fill)

    def _forget(self, fill: Fill) -> None:
        """New requests for the digest start a fill of their own from now on."""
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]

    async def _download(self, fill: Fill, upstream: UpstreamClient, target: Target) -> bool:
        """Fetch the blob into storage; False when another process is already filling it."""
        try:
            partial: PartialBlob | None = self._storage.try_begin_blob(fill.digest)
        except OSError as exc:  # a read-only or full cache, out of descriptors
            # Streamed to this process's clients all the same, verified, not cached (as
            # registry:2 serves what it cannot store); new requests start fills of their own.
            _spool_failed(fill, exc)
            fill.spool_dropped = True
            self._forget(fill)
            self._write_failed(exc)
            partial = _NoSpool()
        if partial is None:
            return False
        metrics.fetch_started()
        try:
            if fill.written:  # we followed another process whose fill died: readers must restart
                raise _other_fill_stopped()
            stream = await upstream.open_blob(target.remote_name, fill.digest, CHUNK)
            try:
                try:
                    partial.announce(stream.content_length)
                except OSError as exc:
                    _spool_failed(fill, exc)
                fill.start(stream.content_length)
                await self._stream(fill, stream.blocks(), partial)
            except BlobStreamError as exc:
                log.warning("upstream %s: blob %s cut short: %s", upstream.name, fill.digest, exc)
                raise UpstreamUnavailable(upstream.name, str(exc)) from exc
            finally:
                stream.close()
        except BaseException:
            metrics.fetch_ended()
            # Before the spool goes: a request joining now could read neither the spool nor
            # the window's start; a fill of its own follows this one's lock, then fetches.
            self._forget(fill)
            if not fill.spool_dropped:  # else aborted already (maybe still, in its thread)
                await asyncio.to_thread(partial.abort)
            raise
        metrics.fetch_ended(pulled=fill.written)
        self._link(fill.names, fill.digest)
        fill.commit()
        self._relink()
        if self._evictor is not None:
            self._evictor.committed(fill.written)
        log.info("cached %s (%s bytes) from %s", fill.digest, fill.written, upstream.name)
        return True

    async def _stream(
        self, fill: Fill, body: AsyncIterator[bytearray], partial: PartialBlob
    ) -> None:
        """Write and hash in order, each in a thread (`InOrder`), so that reading, writing
        and hashing overlap; verify the digest, then commit."""
        hasher = hashlib.sha256()
        pending: collections.deque[asyncio.Future[None]] = collections.deque()
        hashing, writing = InOrder(self._threads), InOrder(self._threads)
        try:
            received = 0
            async for block in body:
                received += len(block)
                fill.receive(block)
                pending.append(hashing.submit(functools.partial(hasher.update, block)))
                if fill.spooling:
                    written = writing.submit(functools.partial(partial.write, block))
                    written.add_done_callback(_advance_when_written(fill, received))
                    pending.append(written)
                while len(pending) > 2 * MAX_UNWRITTEN // CHUNK:
                    await _settle(fill, pending.popleft())
                if not fill.spooling:
                    await self._drop_spool(fill, partial, pending)
                    await _keep_pace(fill)
            for future in pending:
                await _settle(fill, future)
            pending.clear()
            await self._drop_spool(fill, partial, pending)  # if it failed on the last writes
        finally:
            # Let the writes finish before the spool is removed: a write still running
            # would go to a closed descriptor, or to the file that reused its number.
            await asyncio.gather(*pending, return_exceptions=True)
            await writing.finished()
        if fill.size is not None and received != fill.size:
            raise RegistryError(
                "UNAVAILABLE", f"upstream blob ended at {received} of {fill.size} bytes", status=502
            )
        digest = "sha256:" + hasher.hexdigest()
        if digest != fill.digest:
            log.error("upstream sent %s for %s: not cached", digest, fill.digest)
            raise RegistryError(
                "DIGEST_INVALID", "upstream blob does not match its digest", status=502
            )
        fill.verify()  # clients finish now; the fsync and rename below are not theirs to wait for
        if fill.spooling:
            # Linked first: a process killed just after the rename leaves a blob its
            # repositories serve (a link whose commit failed only means a fetch again).
            self._link(fill.names, fill.digest)
            try:
                await asyncio.to_thread(partial.commit, received)
                return
            except OSError as exc:  # the fsync failed, or the spool lacks bytes: not cached
                _spool_failed(fill, exc)
                await self._drop_spool(fill, partial, pending)
        while fill.has_readers:  # the window's last bytes are theirs alone
            await fill.changed()
        log.warning("served %s without caching it: the spool failed", fill.digest)
        raise RegistryError("UNAVAILABLE", "the blob could not be cached", status=503)

    async def _drop_spool(
        self, fill: Fill, partial: PartialBlob, pending: collections.deque[asyncio.Future[None]]
    ) -> None:
        """Once the spool failed (a full disk): stop being the fill every worker waits on.
        New requests start fills of their own, followers in other workers find the lock free
        and go on without this one, and the spool's space is free again. Readers here keep the
        spool they opened, and the window."""
        if fill.spooling or fill.spool_dropped:
            return
        for future in pending:  # the writer must be done with the file before it closes
            await _settle(fill, future)
        pending.clear()
        self._forget(fill)
        fill.spool_dropped = True
        await asyncio.to_thread(partial.abort)
        if fill.spool_error is not None:
            self._write_failed(fill.spool_error)

    async def _follow(self, fill: Fill) -> None:
        """Track another process's fill of the same blob until it ends. Once readers have
        bytes of its spool, a spool that shrinks or is replaced (that fill failed, another
        began) fails them: they must never go on with another download's bytes."""
        followed = 0
        while (progress := self._storage.partial_progress(fill.digest)) is not None:
            written, size, spool = progress
            if fill.written and (written < fill.written or spool != followed):
                if not spool and self._storage.committed_from(fill.digest, followed):
                    return  # committed: renamed into place, the lock not yet released
                raise _other_fill_stopped()
            followed = spool
            if size is not None and not fill.started.is_set():
                fill.start(size)
            if written != fill.written:
                fill.advance(written)
            await asyncio.sleep(FOLLOW_POLL)
        # The lock is free: the fill followed committed, or failed (and maybe another one
        # committed since: its bytes are not those the readers had).
        if fill.written and not self._storage.committed_from(fill.digest, followed):
            raise _other_fill_stopped()


class _NoSpool(PartialBlob):
    """The spool of a fill whose spool could not even begin: nothing is written, nor kept."""

    def announce(self, size: int | None) -> None:
        pass

    def write(self, data: bytes | bytearray) -> None:
        raise OSError("no spool")  # pragma: no cover  (never called: the fill is not spooling)

    def commit(self, size: int) -> None:
        raise OSError("no spool")  # pragma: no cover

    def abort(self) -> None:
        pass


def _other_fill_stopped() -> RegistryError:
    """For readers that had bytes of another worker's fill that did not end in its commit."""
    return RegistryError("UNAVAILABLE", "the fill in another worker stopped; retry", status=503)


async def _keep_pace(fill: Fill) -> None:
    """Without a spool, read the upstream no further than a window ahead of the slowest
    reader; give up when nobody reads at all."""
    while fill.unread() > WINDOW:
        try:
            await asyncio.wait_for(fill.changed(), None if fill.has_readers else UNREAD_TIMEOUT)
        except TimeoutError:
            raise RegistryError(
                "UNAVAILABLE", "the blob could not be cached and nobody reads it", status=503
            ) from None


async def _settle(fill: Fill, future: asyncio.Future[None]) -> None:
    """Wait for a hash or a write; a failed write stops the spooling. Here, not only in its
    done callback: a future already done when awaited returns before its callbacks have run,
    and the fill then committed a spool that lacked the failed block."""
    try:
        await future
    except OSError as error:
        if fill.spooling:
            _spool_failed(fill, error)


def _spool_failed(fill: Fill, error: OSError) -> None:
    """ENOSPC, EDQUOT, EIO...: go on without the spool."""
    log.warning("cannot spool %s (%s): streaming it without caching", fill.digest, error)
    fill.stop_spooling(error)


def _advance_when_written(fill: Fill, written: int) -> Callable[[asyncio.Future[None]], None]:
    def advance(future: asyncio.Future[None]) -> None:
        if future.cancelled() or not fill.spooling:
            return
        if (error := future.exception()) is None:
            fill.advance(written)
        elif isinstance(error, OSError):
            _spool_failed(fill, error)

    return advance

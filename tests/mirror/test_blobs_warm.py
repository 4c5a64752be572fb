"""Warm reads: pieces from the page cache on the event loop, from a thread otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from edgeproxy.mirror.blobs import READ_CHUNK, BlobService
from edgeproxy.mirror.storage.filesystem import FileReader, FilesystemStorage

SIZE = 3 * 1024 * 1024 + 12345  # pieces of both sizes, and a short last one


class DiskOnlyReader(FileReader):
    """A reader whose bytes are never in memory: every piece goes through the thread."""

    def read_cached(self, offset: int, length: int) -> None:
        return None


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "data"
    path.write_bytes(data)
    return path, data


def test_read_cached_gives_what_read_gives(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    reader = FileReader(path)
    try:
        reader.read(0, SIZE)  # in the page cache now
        for offset, length in [(0, 1000), (SIZE - 10, 1000), (SIZE, 10)]:
            cached = reader.read_cached(offset, length)
            assert cached is not None
            assert bytes(cached) == data[offset : offset + length]
    finally:
        reader.close()


@pytest.mark.parametrize("reader_type", [FileReader, DiskOnlyReader])
@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("start, end", [(0, SIZE), (1, SIZE - 1), (SIZE - 5, SIZE)])
def test_read_stored_sends_the_range_in_pieces_of_the_schemes_size(
    tmp_path: Path,
    blob: tuple[Path, bytes],
    reader_type: type[FileReader],
    scheme: str,
    start: int,
    end: int,
) -> None:
    path, data = blob
    service = BlobService(FilesystemStorage(tmp_path / "root"))

    async def read() -> list[bytes]:
        with contextlib.closing(reader_type(path)) as reader:
            return [bytes(piece) async for piece in service.read_stored(reader, scheme, start, end)]

    pieces = asyncio.run(read())
    assert b"".join(pieces) == data[start:end]
    assert max(len(piece) for piece in pieces) <= READ_CHUNK[scheme]
    assert len(pieces) == 2 * -(-(end - start) // READ_CHUNK[scheme])
    assert not any(pieces[1::2]), "an empty piece after each"


class CountingReader(FileReader):
    """Which pieces were read (from the page cache or the disk)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.offsets: set[int] = set()

    def read(self, offset: int, length: int) -> bytes:
        self.offsets.add(offset)
        return super().read(offset, length)

    def read_cached(self, offset: int, length: int) -> memoryview | None:
        self.offsets.add(offset)
        return super().read_cached(offset, length)


def test_a_stalled_client_holds_one_piece_not_two(tmp_path: Path, blob: tuple[Path, bytes]) -> None:
    """uvicorn's send() waits at its start while the client's socket is full. Sent after each
    piece, the empty one waits there, before the next piece is read into memory."""
    path, _ = blob
    service = BlobService(FilesystemStorage(tmp_path / "root"))
    reader = CountingReader(path)

    async def run() -> None:
        stalled = asyncio.Event()

        async def stream_to_a_stalled_client() -> None:
            sent = 0
            async for piece in service.read_stored(reader, "http", 0, SIZE):
                if sent:  # the first piece filled the socket: every later send waits
                    stalled.set()
                    await asyncio.Event().wait()
                sent += len(piece)

        task = asyncio.create_task(stream_to_a_stalled_client())
        await stalled.wait()
        await asyncio.sleep(0.2)  # time for a read that should not happen (none is awaited)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with contextlib.closing(reader):
        asyncio.run(run())
    assert reader.offsets == {0}

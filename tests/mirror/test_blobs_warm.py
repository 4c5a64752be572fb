"""Warm reads: pieces from the page cache on the event loop, from a thread otherwise."""

from __future__ import annotations

import asyncio
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
        return [
            bytes(piece)
            async for piece in service.read_stored(reader_type(path), scheme, start, end)
        ]

    pieces = asyncio.run(read())
    assert b"".join(pieces) == data[start:end]
    assert max(len(piece) for piece in pieces) <= READ_CHUNK[scheme]
    assert len(pieces) == -(-(end - start) // READ_CHUNK[scheme])

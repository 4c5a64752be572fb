"""The small storage interface the mirror is written against.

Content is addressed by sha256 digest. A blob enters storage through a `PartialBlob` (a
local spool file that readers may follow while it grows) and becomes visible only through
`commit`, after the caller verified its digest. An object-store backend keeps the same
interface: it spools locally and uploads on commit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class BlobReader(ABC):
    """Random access to one blob (committed, or a spool file still being written)."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def close(self) -> None: ...


class PartialBlob(ABC):
    """A blob being filled: exclusive to one writer across all processes."""

    path: Path

    @abstractmethod
    def announce(self, size: int | None) -> None:
        """Tell followers in other processes how long the blob will be."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Append `data` (called from one worker thread at a time)."""

    @abstractmethod
    def commit(self) -> None:
        """Make the written bytes the blob (the caller has verified the digest)."""

    @abstractmethod
    def abort(self) -> None:
        """Throw the written bytes away."""


class Storage(ABC):
    # Blobs
    @abstractmethod
    def blob_size(self, digest: str) -> int | None:
        """The size of a committed blob, None when it is not in the cache."""

    @abstractmethod
    def open_blob(self, digest: str) -> BlobReader: ...

    @abstractmethod
    def try_begin_blob(self, digest: str) -> PartialBlob | None:
        """Start filling `digest`; None when another process is filling it right now, or
        has just committed it."""

    @abstractmethod
    def partial_progress(self, digest: str) -> tuple[int, int | None] | None:
        """(bytes written, expected size) of another process's fill; None when none runs."""

    @abstractmethod
    def open_partial(self, digest: str) -> BlobReader | None:
        """A reader of the fill in progress (or of the blob, if it was just committed)."""

    # Repositories
    @abstractmethod
    def link_blob(self, name: str, digest: str) -> None:
        """Record that repository `name` uses a blob (registry:2's _layers link)."""

    @abstractmethod
    def read_manifest(self, name: str, digest: str) -> bytes | None: ...

    @abstractmethod
    def write_manifest(self, name: str, digest: str, data: bytes) -> None:
        """Store verified manifest bytes and link them to the repository."""

    @abstractmethod
    def read_tag(self, name: str, tag: str) -> tuple[str, float] | None:
        """(digest, time the tag was last confirmed with the upstream) or None."""

    @abstractmethod
    def write_tag(self, name: str, tag: str, digest: str) -> None:
        """Point `tag` at `digest` and mark it confirmed now."""

    @abstractmethod
    def list_tags(self, name: str) -> list[str]: ...

    @abstractmethod
    def repositories(self) -> list[str]: ...

"""The small storage interface the mirror is written against.

Content is addressed by sha256 digest. A blob enters storage through a `PartialBlob` (a
local spool file that readers may follow while it grows) and becomes visible only through
`commit`, after the caller verified its digest. An object-store backend keeps the same
interface: it spools locally and uploads on commit.

Every pull is recorded (`record_*_pull`, throttled by the caller) as a last-pull time that
all worker processes see and that survives restarts; eviction lists the content with those
times and removes what the limits say.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoredBlob:
    """A committed blob (manifests are blobs too)."""

    digest: str
    size: int
    last_pull: float  # seconds since the epoch


@dataclass(frozen=True)
class StoredManifest:
    """A manifest revision of one repository, and the tags that point at it."""

    name: str
    digest: str
    last_pull: float
    tags: tuple[str, ...]


class BlobReader(ABC):
    """Random access to one blob (committed, or a spool file still being written)."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes: ...

    def read_cached(self, offset: int, length: int) -> bytes | memoryview | None:
        """What `read` would return, if it is in memory already; None when reading would
        wait for the disk or the network. Cheap enough for the event loop to call."""
        return None

    @property
    @abstractmethod
    def size(self) -> int:
        """The length of what this reader holds open."""

    @abstractmethod
    def close(self) -> None: ...


class PartialBlob(ABC):
    """A blob being filled: exclusive to one writer across all processes."""

    path: Path

    @abstractmethod
    def announce(self, size: int | None) -> None:
        """Tell followers in other processes how long the blob will be."""

    @abstractmethod
    def write(self, data: bytes | bytearray) -> None:
        """Append `data` (called from one worker thread at a time)."""

    @abstractmethod
    def commit(self, size: int) -> None:
        """Make the written bytes the blob: the caller verified the digest of the `size`
        bytes it wrote. Raise OSError, and keep nothing, unless every write succeeded and
        they made `size` bytes."""

    @abstractmethod
    def abort(self) -> None:
        """Throw the written bytes away."""


class Storage(ABC):
    # Blobs
    @abstractmethod
    def blob_size(self, digest: str) -> int | None:
        """The size of a committed blob, None when it is not in the cache."""

    @abstractmethod
    def open_blob(self, digest: str) -> BlobReader:
        """A reader that keeps reading the blob even if it is removed meanwhile."""

    @abstractmethod
    def try_begin_blob(self, digest: str) -> PartialBlob | None:
        """Start filling `digest`; None when another process is filling it right now, or
        has just committed it."""

    @abstractmethod
    def partial_progress(self, digest: str) -> tuple[int, int | None, int] | None:
        """(bytes written, expected size, which spool: 0 before it exists) of another
        process's fill; None when none runs. A new spool is another fill's."""

    @abstractmethod
    def committed_from(self, digest: str, spool: int) -> bool:
        """Whether the blob in the cache is the spool `spool` (of `partial_progress`),
        committed: not another fill's."""

    @abstractmethod
    def open_partial(self, digest: str) -> BlobReader | None:
        """A reader of the fill in progress (or of the blob, if it was just committed)."""

    # Repositories
    @abstractmethod
    def link_blob(self, name: str, digest: str) -> None:
        """Record that repository `name` uses a blob (registry:2's _layers link)."""

    @abstractmethod
    def blob_linked(self, name: str, digest: str) -> bool:
        """Whether repository `name` has a blob's link: the upstream gave it there."""

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

    # Last pulls and eviction
    @abstractmethod
    def record_manifest_pull(self, name: str, digest: str) -> None:
        """Mark a manifest of repository `name` pulled now (nothing if it is not stored)."""

    @abstractmethod
    def record_blob_pull(self, name: str, digest: str) -> None:
        """Mark a blob pulled now through repository `name`; nothing if it is not stored."""

    @abstractmethod
    def free_space(self) -> int:
        """Bytes the cache may still write on the file system that holds it."""

    @abstractmethod
    def blobs(self) -> Iterator[StoredBlob]:
        """Every committed blob, manifests included."""

    @abstractmethod
    def manifests(self) -> Iterator[StoredManifest]:
        """Every manifest revision of every repository."""

    @abstractmethod
    def manifest_last_pull(self, name: str, digest: str) -> float | None: ...

    @abstractmethod
    def blob_last_pull(self, digest: str) -> float | None: ...

    @abstractmethod
    def remove_manifest(self, name: str, digest: str) -> None:
        """Forget a revision and the tags pointing at it (its bytes stay: they are a blob);
        a repository left without manifests goes too."""

    @abstractmethod
    def remove_uploads(self, before: float) -> int:
        """Delete the uploads a registry:2 left that began before `before` (edgeproxy makes
        none); how many."""

    @abstractmethod
    def remove_leftovers(self, before: float) -> int:
        """Delete what a killed process left: write temporaries and empty blob folders dated
        before `before`, and tags whose revision is gone; how many."""

    @abstractmethod
    def remove_blobs(self, digests: list[str]) -> None:
        """Delete blobs and every repository's links to them; readers holding one open
        finish. One call for many: the repositories are looked through once."""

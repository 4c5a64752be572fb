"""Re-hash what the cache holds: a blob (manifests are blobs too) must match its digest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

from edgeproxy.mirror.storage import Storage, StoredBlob

CHUNK = 1024 * 1024


def rehash(storage: Storage, digest: str, progress: Callable[[int], object] | None = None) -> str:
    """The digest of the stored bytes of `digest` (FileNotFoundError when it is gone)."""
    algorithm = digest.partition(":")[0]
    hasher = hashlib.new(algorithm)
    reader = storage.open_blob(digest)
    try:
        position = 0
        while chunk := reader.read(position, CHUNK):
            hasher.update(chunk)
            position += len(chunk)
            if progress is not None:
                progress(len(chunk))
    finally:
        reader.close()
    return f"{algorithm}:{hasher.hexdigest()}"


class Finding(NamedTuple):
    blob: StoredBlob
    problem: str  # "holds bytes of sha256:...", "cannot be read: ..."
    corrupt: bool  # the bytes are wrong; False: they could not be read (maybe for now)


def findings(
    storage: Storage, progress: Callable[[int], object] | None = None
) -> Iterator[Finding]:
    """Each stored blob whose bytes do not match its name, or that cannot be read (a failing
    disk is what a check is for: it goes on to the next blob)."""
    for blob in storage.blobs():
        try:
            actual = rehash(storage, blob.digest, progress)
        except FileNotFoundError:  # removed meanwhile (an eviction)
            continue
        except ValueError:  # a folder named after no hash algorithm
            yield Finding(blob, "is named after an unknown algorithm", corrupt=True)
        except OSError as exc:
            yield Finding(blob, f"cannot be read: {exc.strerror or exc}", corrupt=False)
        else:
            if actual != blob.digest:
                yield Finding(blob, f"holds bytes of {actual}", corrupt=True)

"""Where the cache keeps blobs, manifests and tags."""

from edgeproxy.mirror.storage.base import (
    BlobReader,
    PartialBlob,
    Storage,
    StoredBlob,
    StoredManifest,
)
from edgeproxy.mirror.storage.filesystem import FilesystemStorage

__all__ = [
    "BlobReader",
    "FilesystemStorage",
    "PartialBlob",
    "Storage",
    "StoredBlob",
    "StoredManifest",
]

"""Last-pull tracking, cheap on the hot path: each item is marked at most once a minute per
process (a metadata write in storage), not once per request."""

from __future__ import annotations

import time

from edgeproxy.mirror.storage import Storage

EVERY = 60.0  # seconds: how stale a last-pull time may be; eviction works in minutes to days
MAX_REMEMBERED = 100_000  # marks remembered before the memory is emptied


class PullRecorder:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._marked: dict[tuple[str, str], float] = {}  # (repository, digest) -> monotonic

    def manifest(self, name: str, digest: str) -> None:
        if self._due((name, digest)):
            self._storage.record_manifest_pull(name, digest)

    def blob(self, name: str, digest: str) -> None:
        if self._due((name, digest)):
            self._storage.record_blob_pull(name, digest)

    def _due(self, key: tuple[str, str]) -> bool:
        now = time.monotonic()
        last = self._marked.get(key)
        if last is not None and now - last < EVERY:
            return False
        if len(self._marked) >= MAX_REMEMBERED:
            self._marked.clear()
        self._marked[key] = now
        return True

"""The filesystem storage's fill protocol, where its failures meet the next fill."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.mirror.storage import FilesystemStorage

DIGEST = "sha256:" + "ab" * 32


def test_a_failed_commit_leaves_the_next_fill_alone(tmp_path: Path) -> None:
    """The commit fails (here a file stands where the blob's folder goes; ENOSPC would do):
    its spool goes before its lock, and the abort that follows touches no later fill."""
    storage = FilesystemStorage(tmp_path)
    partial = storage.try_begin_blob(DIGEST)
    assert partial is not None
    partial.write(b"bytes")
    blocker = storage.blob_path(DIGEST).parent.parent
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("")
    with pytest.raises(OSError):
        partial.commit()
    spool = storage.fill_path(DIGEST, "partial")
    assert not spool.exists()
    successor = storage.try_begin_blob(DIGEST)  # another worker, just then
    assert successor is not None
    partial.abort()  # what the failed fill does next
    assert spool.exists()
    successor.abort()
    assert not list(storage.fill_path(DIGEST, "").parent.iterdir())

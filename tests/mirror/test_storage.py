"""The filesystem storage's fill protocol, where its failures meet the next fill."""

from __future__ import annotations

import errno
import os
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
        partial.commit(len(b"bytes"))
    spool = storage.fill_path(DIGEST, "partial")
    assert not spool.exists()
    successor = storage.try_begin_blob(DIGEST)  # another worker, just then
    assert successor is not None
    partial.abort()  # what the failed fill does next
    assert spool.exists()
    successor.abort()
    assert not list(storage.fill_path(DIGEST, "").parent.iterdir())


@pytest.mark.parametrize("case", ["short", "failed write"])
def test_a_commit_of_a_spool_lacking_bytes_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The caller verified the digest of what it received; the spool must hold exactly that,
    every write having landed, or no blob appears (it was once committed a block short)."""
    storage = FilesystemStorage(tmp_path)
    partial = storage.try_begin_blob(DIGEST)
    assert partial is not None
    partial.write(b"first ")
    if case == "failed write":

        def full(fd: int, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(os, "write", full)
            with pytest.raises(OSError):
                partial.write(b"second")
    with pytest.raises(OSError, match="the spool holds 6 of 12 bytes"):
        partial.commit(len(b"first second"))
    assert storage.blob_size(DIGEST) is None
    assert not list(storage.fill_path(DIGEST, "").parent.iterdir())  # spool and size gone
    assert storage.try_begin_blob(DIGEST) is not None  # and the lock free

"""A small file system of the test's own (a tmpfs), to fill up for real."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(root: Path, size: str = "20m") -> Iterator[Path]:
    """A tmpfs of `size` mounted on `root` (made); the test is skipped where none can be."""
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


def fill_up(path: Path) -> None:
    """Write `path` until the file system is full."""
    with path.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 1024 * 1024)
        except OSError:
            pass
        try:  # the last few blocks
            while True:
                file.write(b"\0" * 4096)
        except OSError:
            pass

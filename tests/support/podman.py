"""podman for the tests: storage of its own, and a registries.conf that names a mirror."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def podman_storage() -> Iterator[list[str]]:
    """podman's storage options for a fresh short folder (its runroot may not be longer than
    50 characters), vfs; the folder is removed afterwards."""
    if shutil.which("podman") is None:
        raise RuntimeError("podman not found: install it (scripts/install --test)")
    root = Path(tempfile.mkdtemp(prefix="podman-"))
    try:
        yield [
            "--root", str(root / "root"), "--runroot", str(root / "run"),
            "--storage-driver", "vfs",
        ]  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def mirror_env(conf: Path, mirror_host: str, *, insecure: bool) -> dict[str, str]:
    """Write a registries.conf at `conf` whose docker.io has `mirror_host` as its mirror; the
    environment that makes podman read it (and not the machine's)."""
    conf.write_text(
        'unqualified-search-registries = []\n[[registry]]\nlocation = "docker.io"\n'
        f'[[registry.mirror]]\nlocation = "{mirror_host}"\n'
        + ("insecure = true\n" if insecure else "")
    )
    return {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}

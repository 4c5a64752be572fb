"""The real container engines the e2e tests drive."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import run_containerd
from tests.support.podman import podman_storage


@pytest.fixture
def podman() -> Iterator[list[str]]:
    """`podman` with storage options of its own, as the start of a command line."""
    with podman_storage() as storage:
        yield ["podman", *storage]


@pytest.fixture
def containerd() -> Iterator[Path]:
    """A containerd of the test's own (no CRI); yields its socket."""
    with run_containerd() as socket:
        yield socket

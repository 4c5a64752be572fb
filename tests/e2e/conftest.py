"""The real container engines the e2e tests drive."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.containerd import run_containerd
from tests.support.dockerd import Dockerd, run_dockerd
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


@pytest.fixture
def start_dockerd(tmp_path: Path) -> Iterator[Callable[..., Dockerd]]:
    """Starts a dockerd of the test's own with extra flags (`--registry-mirror URL`), stopped
    after the test; its docker CLI keeps logins in `tmp_path/docker-config`, never ~/.docker."""
    with ExitStack() as stack:

        def start(*flags: str) -> Dockerd:
            return stack.enter_context(run_dockerd(flags, tmp_path / "docker-config"))

        yield start

"""A containerd of the test's own (no CRI), driven with `ctr`."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.wait import wait_until


@contextmanager
def run_containerd() -> Iterator[Path]:
    """Start containerd in a fresh short folder; yield its socket; stop it and clean up."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        raise RuntimeError("containerd not found: install it (scripts/install --test)")
    root = Path(tempfile.mkdtemp(prefix="ctrd-"))
    socket = root / "c.sock"
    (root / "config.toml").write_text(
        f'version = 2\nroot = "{root}/root"\nstate = "{root}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
    )
    with (root / "containerd.log").open("wb") as log:
        process = subprocess.Popen(
            ["containerd", "--config", str(root / "config.toml")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        if not wait_until(socket.exists):
            raise RuntimeError(
                f"containerd did not start:\n{(root / 'containerd.log').read_text()}"
            )
        yield socket
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)

"""A dockerd of the test's own (Debian's docker.io), driven with the `docker` CLI.

Everything it writes is under one fresh short folder: data root, exec root (its own containerd
and that containerd's sockets, hence short), pidfile, socket, and the trust key it would
otherwise create as /etc/docker/key.json. No iptables, no bridge, vfs storage: nothing of the
machine's networking or of a system-wide dockerd/containerd is touched. The one thing left
outside is /run/docker/plugins, a path dockerd hard-codes; it is removed again when empty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.support.wait import wait_until

PLUGINS_RUN_DIR = Path("/run/docker/plugins")


@dataclass(frozen=True)
class Dockerd:
    """A running dockerd: its socket, the client's DOCKER_CONFIG, its log."""

    socket: Path
    docker_config: Path
    log_path: Path

    def docker(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `docker ARGS` against this daemon (never checked: tests look at the result)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env |= {"DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.docker_config)}
        return subprocess.run(
            ["docker", *args], env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_dockerd(flags: Sequence[str], docker_config: Path) -> Iterator[Dockerd]:
    """Start dockerd with extra `flags` (e.g. `--registry-mirror URL`) in a fresh short folder;
    yield it once `docker info` answers; stop it and clean up. The CLI's config (logins) goes
    to `docker_config`."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        raise RuntimeError("dockerd not found: install docker.io (scripts/install --test)")
    root = Path(tempfile.mkdtemp(prefix="dkd-"))
    docker_config.mkdir(parents=True, exist_ok=True)
    daemon = Dockerd(root / "d.sock", docker_config, root / "dockerd.log")
    # A daemon.json key only (no flag): where the trust key goes instead of /etc/docker.
    (root / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(root / "key.json")}))
    plugins_existed = PLUGINS_RUN_DIR.exists()
    with daemon.log_path.open("wb") as log:
        process = subprocess.Popen(
            ["dockerd", "--config-file", str(root / "daemon.json"),
             "--data-root", str(root / "data"), "--exec-root", str(root / "x"),
             "--pidfile", str(root / "d.pid"), "-H", f"unix://{daemon.socket}",
             "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false",
             "--bridge=none", *flags],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def up() -> bool:  # answering, or exited (reported below)
            return process.poll() is not None or daemon.docker("info", timeout=30).returncode == 0

        if not wait_until(up, timeout=60) or process.poll() is not None:
            raise RuntimeError(f"dockerd did not start (exit {process.poll()}):\n{daemon.log()}")
        yield daemon
    finally:
        process.terminate()  # dockerd stops its containerd and unmounts its data root
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if os.path.ismount(root / "data"):  # left mounted by a dockerd that was killed
            subprocess.run(["umount", "--lazy", str(root / "data")], check=False)
        shutil.rmtree(root, ignore_errors=True)
        if not plugins_existed:
            with suppress(OSError):
                PLUGINS_RUN_DIR.rmdir()
                PLUGINS_RUN_DIR.parent.rmdir()

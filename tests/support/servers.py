"""Servers for tests: an ASGI app under uvicorn in a thread, and edgeproxy as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w
import uvicorn

from tests.support.ports import free_port, wait_for_port


@contextmanager
def serve_app(app: Any, port: int | None = None, **options: Any) -> Iterator[str]:
    """Run `app` on 127.0.0.1 in a thread with its own event loop; yield its base URL.
    `options` go to uvicorn.Config."""
    port = port or free_port()
    options = {"log_level": "warning", "lifespan": "on", **options}
    config = uvicorn.Config(app, host="127.0.0.1", port=port, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    wait_for_port("127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write a test config as TOML; return its path."""
    path.write_text(tomli_w.dumps(data))
    return path


# Root without the power to read or write anyone's files (util-linux's setpriv): a file
# owned by another user with mode 0600 is then as unreadable as it is to the service's user.
WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


class EdgeproxyProcess:
    """`edgeproxy run --config FILE` as a child process, its log in a file."""

    def __init__(
        self,
        config_path: Path,
        port: int,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.config_path = config_path
        self.prefix = list(prefix)  # a command that runs it, e.g. WITHOUT_DAC
        self.env = {**os.environ, **(env or {})}
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.host = f"127.0.0.1:{port}"
        self.log_path = config_path.with_suffix(".log")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    *self.prefix,
                    *(sys.executable, "-m", "edgeproxy.cli", "run", "--config"),
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        try:
            wait_for_port("127.0.0.1", self.port, timeout=20)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"edgeproxy did not start:\n{self.log()}") from None

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def stop(self) -> int | None:
        """SIGTERM the process group (as systemd and Ctrl-C do); its exit code, if it ran."""
        if self._process is None:
            return None
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            code = self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            code = self._process.wait()
        self._process = None
        return code

    def wait(self, timeout: float = 60) -> int:
        """Wait for the process to exit by itself; its exit code."""
        assert self._process is not None, "not started"
        code = self._process.wait(timeout=timeout)
        self._process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_edgeproxy(
    workdir: Path,
    upstreams: list[dict[str, Any]],
    env: dict[str, str] | None = None,
    **mirror: Any,
) -> Iterator[EdgeproxyProcess]:
    """Start edgeproxy with a mirror of `upstreams` on a free port, with `env` added to its
    environment; stop it afterwards."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "mirror": {
            "root": str(workdir / "cache"),
            "listen": f"127.0.0.1:{port}",
            **mirror,
            "upstream": upstreams,
        }
    }
    process = EdgeproxyProcess(write_toml(workdir / "proxy.toml", config), port, env)
    process.start()
    try:
        yield process
    finally:
        process.stop()

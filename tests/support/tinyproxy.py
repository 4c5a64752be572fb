"""A real outbound HTTP proxy for tests: Debian's tinyproxy on loopback, logging each request."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port, wait_for_port

OUTGOING = "127.0.0.2"  # the address the proxy connects from


@dataclass
class Tinyproxy:
    port: int
    log_path: Path

    def url(self, credentials: tuple[str, str] | None = None) -> str:
        user = f"{credentials[0]}:{credentials[1]}@" if credentials else ""
        return f"http://{user}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines it took: `GET http://host/path HTTP/1.1`, `CONNECT host:port ...`."""
        marker = "Request (file descriptor "
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line.split("): ", 1)[1] for line in lines if marker in line]


@contextmanager
def run_tinyproxy(workdir: Path, credentials: tuple[str, str] | None = None) -> Iterator[Tinyproxy]:
    """tinyproxy on 127.0.0.1, open to loopback clients, asking for `credentials` (Basic) if
    given; any port may be CONNECTed to (no ConnectPort line). Its own connections come from
    `OUTGOING`, so an upstream's access log tells proxied requests from direct ones."""
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy is not installed (scripts/test installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    proxy = Tinyproxy(free_port(), workdir / "tinyproxy.log")
    config = workdir / "tinyproxy.conf"
    lines = [
        f"Port {proxy.port}",
        "Listen 127.0.0.1",
        "Allow 127.0.0.1",
        f"Bind {OUTGOING}",
        "Timeout 60",
        "MaxClients 64",
        f'LogFile "{proxy.log_path}"',
        "LogLevel Connect",
        "DisableViaHeader Yes",
    ]
    if credentials:
        lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
    config.write_text("\n".join(lines) + "\n")
    with (workdir / "tinyproxy.out").open("wb") as out:
        process = subprocess.Popen([binary, "-d", "-c", str(config)], stdout=out, stderr=out)
    try:
        try:
            wait_for_port("127.0.0.1", proxy.port)
        except TimeoutError:
            raise RuntimeError((workdir / "tinyproxy.out").read_text()) from None
        yield proxy
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

"""The process model: a master that binds, forks workers, replaces a dead one, drains."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.support.ports import free_port
from tests.support.servers import EdgeproxyProcess, write_toml
from tests.support.wait import wait_until


def workers_started(process: EdgeproxyProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker (\d+) started", process.log())]


def test_workers_share_the_listener_and_are_replaced(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "mirror": {
            "root": str(tmp_path / "cache"),
            "listen": f"127.0.0.1:{port}",
            "upstream": [{"name": "docker.io", "url": f"http://127.0.0.1:{free_port()}"}],
        },
        "edge": {"http": f"127.0.0.1:{free_port()}", "workers": 3},
    }
    process = EdgeproxyProcess(write_toml(tmp_path / "proxy.toml", config), port)
    process.start()
    try:
        assert wait_until(lambda: len(workers_started(process)) == 3)
        first = workers_started(process)[0]
        os.kill(first, signal.SIGKILL)
        assert wait_until(lambda: len(workers_started(process)) == 4)
        for _ in range(20):  # every worker answers: no request meets the dead one
            assert httpx.get(f"{process.url}/v2/").status_code == 200
    finally:
        code = process.stop()
    assert code == 0
    assert f"worker {first} exited with -9; starting another" in process.log()


def run_fails(tmp_path: Path, config: dict[str, Any]) -> str:
    """`edgeproxy run` of `config`, which must exit 1 before any worker starts; its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "edgeproxy.cli", "run", "--config",
         str(write_toml(tmp_path / "proxy.toml", config))],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "worker" not in result.stderr, result.stderr
    return result.stderr


def test_an_unusable_cache_root_is_reported_before_any_worker_starts(tmp_path: Path) -> None:
    config = {
        "mirror": {
            "root": "/proc/no-such-dir/cache",
            "listen": f"127.0.0.1:{free_port()}",
            "upstream": [{"name": "docker.io", "url": "http://127.0.0.1:1"}],
        }
    }
    assert "mirror.root: cannot create /proc/no-such-dir/cache" in run_fails(tmp_path, config)


def test_an_access_log_that_cannot_open_is_reported_before_any_worker_starts(
    tmp_path: Path,
) -> None:
    """Each worker used to fail with a traceback; nginx says `open() ... failed` at start."""
    config = {
        "mirror": {
            "root": str(tmp_path / "cache"),
            "upstream": [{"name": "docker.io", "url": "http://127.0.0.1:1"}],
        },
        "edge": {"http": f"127.0.0.1:{free_port()}", "access_log": "/proc/no-such-dir/access.log"},
    }
    stderr = run_fails(tmp_path, config)
    assert "edge.access_log: cannot open /proc/no-such-dir/access.log" in stderr


def test_a_port_taken_is_reported_with_its_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = {
            "mirror": {
                "root": str(tmp_path / "cache"),
                "upstream": [{"name": "docker.io", "url": "http://127.0.0.1:1"}],
            },
            "edge": {"http": f"127.0.0.1:{port}"},
        }
        stderr = run_fails(tmp_path, config)
    assert f"edge.http: cannot listen on 127.0.0.1:{port}: Address already in use" in stderr


def test_an_embedded_server_loads_no_library_it_does_not_use() -> None:
    """Each is several MB in every worker: aiohttp only for points-to, jwt and cryptography
    only for [mirror.auth], rich only for `edgeproxy cache` (httpx would load it for its CLI)."""
    code = (
        "import sys, edgeproxy.cli, edgeproxy.server, httpx;"
        "print(*[m for m in ('aiohttp', 'jwt', 'cryptography', 'rich') if sys.modules.get(m)])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""

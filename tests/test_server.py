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


def mirror_listening(tmp_path: Path, port: int) -> dict[str, Any]:
    """A mirror on `port` whose upstream nobody answers (127.0.0.1:1)."""
    return {
        "root": str(tmp_path / "cache"),
        "listen": f"127.0.0.1:{port}",
        "upstream": [{"name": "docker.io", "url": "http://127.0.0.1:1"}],
    }


def test_workers_share_the_listener_and_are_replaced(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "mirror": mirror_listening(tmp_path, port),
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


def exited(pid: int) -> bool:
    """Gone, or a zombie: its files (and locks) are closed either way."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_metrics_folder_of_a_killed_master_goes_at_the_next_start(tmp_path: Path) -> None:
    """A master killed with its workers (SIGKILL, the OOM killer) runs no `finally`: each left
    an empty edgeproxy-metrics-* folder in /tmp (one per test run, test_faults_kill's). The
    next start removes it; a running edgeproxy's is kept."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    def start(name: str) -> EdgeproxyProcess:
        port = free_port()
        config = {
            "mirror": mirror_listening(tmp_path, port),
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        }
        path = write_toml(tmp_path / f"{name}.toml", config)
        process = EdgeproxyProcess(path, port, env={"TMPDIR": str(tmp)})
        process.start()
        return process

    def folders() -> set[Path]:
        return set(tmp.glob("edgeproxy-metrics-*"))

    killed = start("killed")
    try:
        assert wait_until(lambda: "ready:" in killed.log())
        (left,) = folders()
        os.killpg(killed.pid, signal.SIGKILL)
        assert wait_until(lambda: all(exited(pid) for pid in workers_started(killed)))
    finally:
        killed.stop()
    assert folders() == {left}
    running = start("running")
    try:
        (kept,) = folders()
        assert kept != left
        second = start("second")
        try:
            assert kept in folders() and len(folders()) == 2
        finally:
            assert second.stop() == 0
    finally:
        assert running.stop() == 0
    assert folders() == set()


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

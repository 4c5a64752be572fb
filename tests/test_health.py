"""Health: 503 when the cache cannot be written (after `threshold` failed probes), 200 again
when it can; an unreachable upstream is "degraded" with a 200."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy.config import HealthConfig
from edgeproxy.health import HealthMonitor
from tests.support.ports import free_port
from tests.support.registry import Registry
from tests.support.servers import EdgeproxyProcess, write_toml
from tests.support.wait import wait_until

OFFLINE_UPSTREAM = {"name": "offline.example", "url": "http://127.0.0.1:1"}


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """`chattr +i`: nothing can be created in `path`, not even by root (chmod would not do)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is missing (Debian's e2fsprogs)")
    result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if result.returncode != 0:  # e.g. tmpfs, or no CAP_LINUX_IMMUTABLE
        pytest.skip(f"chattr +i does not work here: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@contextmanager
def mirror_with_health(
    tmp_path: Path, upstreams: list[dict[str, Any]]
) -> Iterator[tuple[EdgeproxyProcess, str]]:
    port, metrics = free_port(), free_port()
    config = {
        "mirror": {
            "root": str(tmp_path / "cache"),
            "listen": f"127.0.0.1:{port}",
            "upstream": upstreams,
        },
        "edge": {"http": f"127.0.0.1:{free_port()}", "workers": 2},
        "metrics": {"listen": f"127.0.0.1:{metrics}"},
        "health": {"interval": "0.2s", "threshold": 2, "timeout": "2s"},
    }
    process = EdgeproxyProcess(write_toml(tmp_path / "proxy.toml", config), port)
    process.start()
    try:
        yield process, f"http://127.0.0.1:{metrics}/debug/health"
    finally:
        process.stop()


def health(url: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(url, timeout=30)
    return response.status_code, response.json()


def test_unwritable_cache_turns_503_and_recovers(tmp_path: Path, registry_none: Registry) -> None:
    upstreams = [{"name": "docker.io", "url": registry_none.url}]
    with mirror_with_health(tmp_path, upstreams) as (process, url):
        assert wait_until(lambda: health(url) == (200, healthy(["docker.io"])))
        with immutable(tmp_path / "cache"):
            # Each worker probes on its own: wait for the one that answers to have seen it.
            answers: list[dict[str, Any]] = []
            assert wait_until(lambda: answered(url, 503, answers))
            document = answers[-1]
            assert document["status"] == "down"
            assert document["storage"]["status"] == "down"
            assert "Operation not permitted" in document["storage"]["error"]
            assert document["upstreams"]["docker.io"]["status"] == "ok"
            # The mirror's own listener answers the same path; the public edge does not.
            assert wait_until(lambda: answered(f"{process.url}/debug/health", 503, answers))
            edge = tomllib.loads((tmp_path / "proxy.toml").read_text())["edge"]["http"]
            assert httpx.get(f"http://{edge}/debug/health", timeout=30).status_code == 404
        assert wait_until(lambda: health(url) == (200, healthy(["docker.io"])))
    assert "storage " in process.log() and " is down: " in process.log()
    assert " is back" in process.log()


def test_an_unreachable_upstream_is_degraded_not_down(
    tmp_path: Path, registry_none: Registry
) -> None:
    upstreams = [{"name": "docker.io", "url": registry_none.url}, OFFLINE_UPSTREAM]
    with mirror_with_health(tmp_path, upstreams) as (_, url):
        assert wait_until(lambda: health(url)[1]["upstreams"]["offline.example"]["failures"] > 0)
        status, document = health(url)
    assert status == 200
    assert document["status"] == "degraded"
    assert document["storage"]["status"] == "ok"
    assert document["upstreams"]["docker.io"]["status"] == "ok"
    assert document["upstreams"]["offline.example"]["status"] == "down"
    assert "ConnectError" in document["upstreams"]["offline.example"]["error"]


def answered(url: str, status: int, answers: list[dict[str, Any]]) -> bool:
    """Whether `url` answers `status` now; its document goes to `answers`."""
    got, document = health(url)
    answers.append(document)
    return got == status


def healthy(upstreams: list[str]) -> dict[str, Any]:
    ok = {"status": "ok", "failures": 0, "error": None}
    return {"status": "ok", "storage": ok, "upstreams": dict.fromkeys(upstreams, ok)}


def test_the_storage_is_down_only_after_threshold_failures_in_a_row(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    monitor = HealthMonitor(root, [], HealthConfig(threshold=3))

    async def checks(count: int) -> int:
        for _ in range(count):
            await monitor.check()
        return monitor.report()[0]

    assert asyncio.run(checks(1)) == 200
    root.rmdir()
    root.write_text("a file where the cache folder was")  # fails for root too: ENOTDIR
    assert asyncio.run(checks(2)) == 200  # two failures: failing, still serving
    assert monitor.report()[1]["storage"]["status"] == "failing"
    assert asyncio.run(checks(1)) == 503
    assert monitor.report()[1]["storage"]["failures"] == 3
    root.unlink()
    root.mkdir()
    assert asyncio.run(checks(1)) == 200  # one success resets the count
    assert list(root.iterdir()) == []  # the probe file is removed each time


def test_a_hung_storage_probe_holds_one_thread_not_one_per_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that hang (a stalled volume) while reads still come from the page cache: each
    timed-out probe kept its thread, and after a few checks the warm reads, which share those
    threads, waited behind them. Now one probe at a time; down as before, and back after."""
    release = threading.Event()
    started: list[int] = []

    def hangs_until_released(self: HealthMonitor) -> None:
        started.append(1)
        release.wait(30)

    monitor = HealthMonitor(tmp_path, [], HealthConfig(threshold=3, timeout=0.01))
    monkeypatch.setattr(HealthMonitor, "_write_and_read", hangs_until_released)

    async def scenario() -> tuple[int, int, str | None, int]:
        for _ in range(5):
            await monitor.check()
        down, threads, error = monitor.report()[0], len(started), monitor.storage.error
        release.set()
        monkeypatch.undo()
        for _ in range(1000):  # until the hung probe has returned and a new one ran
            await monitor.check()
            if monitor.storage.error is None:
                break
            await asyncio.sleep(0.01)
        return down, threads, error, monitor.report()[0]

    down, threads, error, after = asyncio.run(scenario())
    assert (down, threads, after) == (503, 1, 200)
    assert error == "the last probe has not returned"


def test_probe_files_of_killed_processes_go_once_old(tmp_path: Path) -> None:
    """A worker killed mid-probe leaves `.edgeproxy-health-<pid>` in the root: the next probe
    of any worker removes one over an hour old (by age: a pid is reused, or is another
    container's); a young one may be a probe going on."""
    dead = tmp_path / ".edgeproxy-health-4194304"
    young = tmp_path / f".edgeproxy-health-{os.getppid()}"
    for path in (dead, young):
        path.write_bytes(b"probe")
    stamp = time.time() - 7200
    os.utime(dead, (stamp, stamp))
    monitor = HealthMonitor(tmp_path, [])
    asyncio.run(monitor.check())
    assert monitor.storage.error is None
    assert not dead.exists()
    assert young.exists()

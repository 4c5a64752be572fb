"""edgeproxy killed with SIGKILL in the middle of a fill, then started again: no partial blob
is ever visible, nothing stale is left in edgeproxy/fills/, and the next fill starts cleanly."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from pathlib import Path

import httpx

from tests.mirror.fake_upstream import fake_upstream
from tests.support.ports import free_port
from tests.support.servers import EdgeproxyProcess, write_toml
from tests.support.verify import verify_cache
from tests.support.wait import wait_until


def pull_digest(url: str) -> str | None:
    """sha256 of the body; None when the connection was cut."""
    hasher = hashlib.sha256()
    try:
        with httpx.stream("GET", url, timeout=60) as response:
            for chunk in response.iter_raw():
                hasher.update(chunk)
    except httpx.HTTPError:
        return None
    return "sha256:" + hasher.hexdigest()


def test_sigkill_mid_fill_then_restart(tmp_path: Path) -> None:
    blob = os.urandom(24 * 1024 * 1024)
    root = tmp_path / "cache"
    fills = root / "edgeproxy" / "fills"
    with fake_upstream() as upstream:
        digest = upstream.add_blob(blob)
        upstream.faults[digest] = "stall"  # half the body, then silence
        port = free_port()
        config = {
            "mirror": {
                "root": str(root),
                "listen": f"127.0.0.1:{port}",
                "upstream": [{"name": "fake", "url": upstream.url, "read_timeout": "600s"}],
            }
        }
        process = EdgeproxyProcess(write_toml(tmp_path / "proxy.toml", config), port)
        url = f"{process.url}/v2/x/blobs/{digest}"
        process.start()
        try:
            client = threading.Thread(target=pull_digest, args=(url,))
            client.start()
            spool = fills / f"{digest.replace(':', '-')}.partial"
            assert wait_until(lambda: spool.exists() and spool.stat().st_size >= len(blob) // 2)
            os.killpg(process.pid, signal.SIGKILL)  # the master and its workers, at once
        finally:
            process.stop()
        client.join(timeout=60)
        # Killed mid-fill: the spool is left, but no blob is visible.
        assert not (root / "docker/registry/v2/blobs/sha256" / digest[7:9]).exists()
        assert verify_cache(root).leftovers != []

        del upstream.faults[digest]
        process.start()  # each worker, starting, sweeps fills/ of what no running fill holds
        try:
            assert wait_until(lambda: verify_cache(root).leftovers == [])
            assert pull_digest(url) == digest
            assert wait_until(lambda: verify_cache(root).blobs == 1)
        finally:
            process.stop()
    report = verify_cache(root)
    assert (report.blobs, report.corrupt, report.leftovers) == (1, [], [])
    assert upstream.requests[f"GET /v2/x/blobs/{digest}"] == 2
    assert not list(fills.iterdir())

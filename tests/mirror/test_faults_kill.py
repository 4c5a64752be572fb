"""edgeproxy killed with SIGKILL in the middle of a fill, then started again: no partial blob
is ever visible, nothing stale is left in edgeproxy/fills/, and the next fill starts cleanly."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from edgeproxy.config import config_from_dict
from edgeproxy.mirror.app import MirrorApp
from tests.conftest import TEST_TAG
from tests.mirror.fake_upstream import fake_upstream
from tests.support.images import build_image, push, random_layer
from tests.support.ports import free_port, wait_for_port
from tests.support.registry import Registry
from tests.support.servers import EdgeproxyProcess, serve_app, write_toml
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


# edgeproxy whose workers die (SIGKILL) the moment a blob's spool is renamed into place.
KILLED_AFTER_COMMIT = """
import os, signal, sys
from edgeproxy import cli
from edgeproxy.mirror.storage.filesystem import FilePartialBlob

commit = FilePartialBlob.commit

def commit_then_die(self, size):
    commit(self, size)
    os.kill(os.getpid(), signal.SIGKILL)

FilePartialBlob.commit = commit_then_die
sys.exit(cli.main(["run", "--config", sys.argv[1]]))
"""


@pytest.mark.e2e
def test_a_worker_killed_just_after_a_commit_leaves_the_blob_servable(
    registry_none: Registry, tmp_path: Path
) -> None:
    """The client had the whole blob, the worker died just after renaming it into place: the
    repository it came from must serve it, with the upstream down too. Its layer link came
    after the commit and was never written: the blob was cached, and unreachable (503)."""
    image = build_image(tmp_path / "image", TEST_TAG, [random_layer(50_000, seed=8)])
    push(image, registry_none, "test/killed-commit", TEST_TAG)
    digest = image.layer_digests[0]
    root = tmp_path / "cache"
    port = free_port()
    mirror = {"root": str(root), "listen": f"127.0.0.1:{port}"}
    config = {
        "mirror": {**mirror, "upstream": [{"name": "docker.io", "url": registry_none.url}]},
        "edge": {"http": f"127.0.0.1:{free_port()}", "workers": 1, "access_log": "off"},
    }
    path = write_toml(tmp_path / "proxy.toml", config)
    log = (tmp_path / "proxy.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_AFTER_COMMIT, str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
        pull_digest(f"http://127.0.0.1:{port}/v2/test/killed-commit/blobs/{digest}")
        assert wait_until(lambda: verify_cache(root).blobs == 1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    unreachable = [{"name": "docker.io", "url": "http://127.0.0.1:9"}]
    down = config_from_dict({"mirror": {**mirror, "upstream": unreachable}})
    with serve_app(MirrorApp(down.mirror)) as url:
        response = httpx.get(f"{url}/v2/test/killed-commit/blobs/{digest}", timeout=30)
        assert response.status_code == 200
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == digest

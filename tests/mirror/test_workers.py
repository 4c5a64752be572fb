"""Processes sharing one cache root fetch each blob from the upstream once."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.mirror.fake_upstream import fake_upstream
from tests.support.ports import free_port
from tests.support.servers import EdgeproxyProcess, write_toml
from tests.support.verify import verify_cache


def test_two_processes_fill_a_blob_once(tmp_path: Path) -> None:
    blob = os.urandom(48 * 1024 * 1024)
    with fake_upstream() as upstream:
        digest = upstream.add_blob(blob)
        processes = []
        for index in range(2):
            port = free_port()
            config = {
                "mirror": {
                    "root": str(tmp_path / "cache"),
                    "listen": f"127.0.0.1:{port}",
                    "upstream": [{"name": "fake", "url": upstream.url}],
                }
            }
            path = write_toml(tmp_path / f"proxy{index}.toml", config)
            processes.append(EdgeproxyProcess(path, port))
        try:
            for process in processes:
                process.start()

            def pull(index: int) -> str:
                url = f"{processes[index % 2].url}/v2/x/blobs/{digest}"
                hasher = hashlib.sha256()
                with httpx.stream("GET", url, timeout=60) as response:
                    assert response.status_code == 200
                    for chunk in response.iter_raw():
                        hasher.update(chunk)
                return "sha256:" + hasher.hexdigest()

            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(pull, range(8))) == {digest}
        finally:
            for process in processes:
                process.stop()
        assert upstream.requests[f"GET /v2/x/blobs/{digest}"] == 1
        # Nothing left: no spool, and no lock file from a follower's last look.
        assert not list((tmp_path / "cache" / "edgeproxy" / "fills").iterdir())
        report = verify_cache(tmp_path / "cache")
        assert (report.blobs, report.corrupt, report.leftovers) == (1, [], [])

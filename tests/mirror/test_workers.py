"""Processes sharing one cache root fetch each blob from the upstream once."""

from __future__ import annotations

import asyncio
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from edgeproxy.mirror.blobs import BlobService, Fill
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.storage import FilesystemStorage
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


class ScriptedSpools(FilesystemStorage):
    """Another process's fill as a script of (written, size, spool) observations, and the
    spool the blob in the cache was committed from (None: no blob)."""

    def __init__(
        self,
        root: Path,
        script: list[tuple[int, int | None, int]],
        committed: int | None = None,
    ) -> None:
        super().__init__(root)
        self.script = script
        self.committed = committed

    def partial_progress(self, digest: str) -> tuple[int, int | None, int] | None:
        return self.script.pop(0) if self.script else None

    def committed_from(self, digest: str, spool: int) -> bool:
        return spool == self.committed


@pytest.mark.parametrize(
    "script",
    [
        [(0, 100, 7), (60, 100, 7), (0, None, 0)],  # its spool gone, the lock another's
        [(0, 100, 7), (60, 100, 7), (10, 100, 8)],  # a new spool, the new fill behind
        [(0, 100, 7), (60, 100, 7), (90, 100, 8)],  # a new spool, already past
    ],
)
def test_a_follower_never_goes_on_with_another_fills_bytes(
    tmp_path: Path, script: list[tuple[int, int | None, int]]
) -> None:
    """Readers that had bytes of one process's spool are failed when that fill ends and
    another begins: going on would end a whole-looking body in the new download's bytes (a
    wrong blob, when the first fill was the one with wrong bytes)."""
    service = BlobService(ScriptedSpools(tmp_path, script))
    fill = Fill("sha256:" + "a" * 64, "x")
    with pytest.raises(RegistryError) as caught:
        asyncio.run(service._follow(fill))
    assert caught.value.status == 503
    assert fill.written == 60


def test_a_follower_takes_a_spool_renamed_into_place_for_the_commit(tmp_path: Path) -> None:
    """Between the commit's rename and the lock's release the spool is gone: that fill
    succeeded (two processes of test_two_processes_fill_a_blob_once saw it now and then)."""
    storage = ScriptedSpools(tmp_path, [(0, 100, 7), (60, 100, 7), (0, 100, 0)], committed=7)
    fill = Fill("sha256:" + "a" * 64, "x")
    asyncio.run(BlobService(storage)._follow(fill))
    assert fill.written == 60  # the fill's loop then finds the blob committed


def test_a_follower_sees_one_fill_through(tmp_path: Path) -> None:
    script: list[tuple[int, int | None, int]] = [(0, 100, 0), (0, 100, 7), (60, 100, 7)]
    service = BlobService(ScriptedSpools(tmp_path, [*script, (100, 100, 7)], committed=7))
    fill = Fill("sha256:" + "a" * 64, "x")
    asyncio.run(service._follow(fill))
    assert (fill.size, fill.written) == (100, 100)


@pytest.mark.parametrize("committed", [None, 8])
def test_a_follower_whose_fill_ended_without_its_commit_fails(
    tmp_path: Path, committed: int | None
) -> None:
    """The lock is free and the spool followed was not committed (that fill failed; another
    may have committed since): readers that had its bytes are failed, not ended with the
    blob now in place (they were given another download's bytes: a whole wrong blob)."""
    script: list[tuple[int, int | None, int]] = [(0, 100, 7), (60, 100, 7)]
    service = BlobService(ScriptedSpools(tmp_path, script, committed=committed))
    fill = Fill("sha256:" + "a" * 64, "x")
    with pytest.raises(RegistryError) as caught:
        asyncio.run(service._follow(fill))
    assert caught.value.status == 503

"""Early eviction passes: fills that may have crossed `max_size` or `min_free`, or that found
the disk full, start a pass before `interval` is up (an hour here: only an early pass can
remove anything while a test runs)."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from edgeproxy.config import CacheConfig, config_from_dict
from edgeproxy.mirror import eviction
from edgeproxy.mirror.app import MirrorApp
from edgeproxy.mirror.eviction import Evictor
from edgeproxy.mirror.storage import FilesystemStorage
from tests.mirror.fake_upstream import FakeUpstream, digest_of, fake_upstream
from tests.support.disk import fill_up, small_tmpfs
from tests.support.servers import serve_app
from tests.support.wait import wait_until

MIB = 1 << 20


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with fake_upstream() as fake:
        yield fake


def mirror_app(upstream: FakeUpstream, root: Path, **cache: object) -> MirrorApp:
    entry = {"name": "fake", "url": upstream.url}
    mirror = {"root": str(root), "upstream": [entry], "cache": {"interval": "1h", **cache}}
    return MirrorApp(config_from_dict({"mirror": mirror}).mirror)


def pull(client: httpx.Client, digest: str, data: bytes) -> None:
    response = client.get(f"/v2/x/blobs/{digest}")
    assert (response.status_code, response.content) == (200, data)


def test_fills_past_the_room_under_max_size_start_a_pass(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    first, second = os.urandom(2 * MIB), os.urandom(2 * MIB)
    a, b = upstream.add_blob(first), upstream.add_blob(second)
    app = mirror_app(upstream, tmp_path / "cache", max_size="3m")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        pull(client, a, first)
        # No pass had measured the cache: the first commit starts one, which removes nothing.
        assert wait_until(lambda: app.evictor._last_pass().size == len(first))
        pull(client, b, second)  # past the 1 MiB that pass left under max_size
        assert wait_until(lambda: app.storage.blob_size(a) is None)
        assert app.storage.blob_size(b) == len(second)


def test_fills_that_leave_less_than_min_free_start_a_pass(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    first, second = os.urandom(5 * MIB), os.urandom(5 * MIB)
    a, b = upstream.add_blob(first), upstream.add_blob(second)
    with small_tmpfs(tmp_path / "small") as root:  # 20 MiB
        app = mirror_app(upstream, root, min_free="12m")
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            pull(client, a, first)
            assert wait_until(lambda: app.storage.blob_size(a) == len(first))
            pull(client, b, second)  # about 10 MiB free now
            assert wait_until(lambda: app.storage.blob_size(a) is None)
            # (A's commit may have seen B's spool already, and made room before B's commit.)
            assert wait_until(lambda: app.storage.blob_size(b) == len(second))
            assert wait_until(lambda: app.storage.free_space() >= 12 * MIB)


@contextmanager
def full_after_one_blob(
    tmp_path: Path, upstream: FakeUpstream
) -> Iterator[tuple[MirrorApp, httpx.Client, str]]:
    """A mirror (min_free 1m) on a 20 MiB tmpfs that cached a 6 MiB blob, then other files
    filled the disk: nothing was committed since. Yields the app, a client, the blob."""
    old = os.urandom(6 * MIB)
    digest = upstream.add_blob(old)
    with small_tmpfs(tmp_path / "small") as root:
        app = mirror_app(upstream, root, min_free="1m")
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            pull(client, digest, old)
            # The fill is over, its commit counted (after the rename): a commit counted once
            # the filler is in finds less than min_free, and its pass removed the blob first.
            assert wait_until(lambda: digest not in app.blobs._fills)
            assert app.storage.blob_size(digest) == len(old)
            fill_up(root / "filler")
            yield app, client, digest


def test_a_fill_that_finds_the_disk_full_starts_a_pass(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The next fill's ENOSPC makes room, and the blob after it is cached."""
    new = os.urandom(3 * MIB)
    c = upstream.add_blob(new)
    with full_after_one_blob(tmp_path, upstream) as (app, client, old):
        pull(client, c, new)  # served, not cached
        assert wait_until(lambda: app.storage.blob_size(old) is None)
        pull(client, c, new)
        assert wait_until(lambda: app.storage.blob_size(c) == len(new))


def test_a_manifest_the_full_disk_refused_starts_a_pass(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A manifest write's ENOSPC, like a fill's: the pass makes room, and the next pull of
    the tag stores the manifest (held in memory meanwhile) and the tag."""
    layer = upstream.add_blob(b"layer")
    digest = upstream.add_manifest("v1", [layer])
    with full_after_one_blob(tmp_path, upstream) as (app, client, old):
        assert client.get("/v2/x/manifests/v1").status_code == 200  # not cached
        assert app.storage.blob_size(digest) is None
        assert wait_until(lambda: app.storage.blob_size(old) is None)
        assert client.get("/v2/x/manifests/v1").status_code == 200
        assert app.storage.blob_size(digest) is not None
        assert app.storage.read_tag("x", "v1") is not None


@pytest.fixture
def storage(tmp_path: Path) -> FilesystemStorage:
    return FilesystemStorage(tmp_path / "cache")


def blob(storage: FilesystemStorage, size: int) -> None:
    data = os.urandom(size)
    partial = storage.try_begin_blob(digest_of(data))
    assert partial is not None
    partial.write(data)
    partial.commit(size)


def test_commits_ask_for_a_pass_only_past_the_room_the_last_one_left(
    storage: FilesystemStorage,
) -> None:
    blob(storage, 1000)
    evictor = Evictor(CacheConfig(max_size=5000), storage, storage.root / "edgeproxy")
    evictor.committed(1000)  # no pass has measured the cache yet
    assert evictor._early.is_set()
    evictor._early.clear()
    assert evictor.prune(wait=False) is not None  # the cache: 1000 bytes
    evictor.committed(3000)
    assert not evictor._early.is_set()  # 4000 fit
    evictor.committed(1001)
    assert evictor._early.is_set()


def test_workers_ask_at_their_share_of_the_room(storage: FilesystemStorage) -> None:
    """Each worker counts only its own commits: with two, each asks once its commits pass
    half the room, so that together they do not pass `max_size` by the room again before a
    pass starts. One worker doing every fill asks at half the room too."""
    blob(storage, 1000)
    state = storage.root / "edgeproxy"
    first, second = (Evictor(CacheConfig(max_size=5000), storage, state, 2) for _ in range(2))
    assert first.prune(wait=False) is not None  # the cache: 1000 bytes, 4000 of room
    first.committed(2000)
    second.committed(2000)
    assert not first._early.is_set() and not second._early.is_set()  # 5000 fit
    first.committed(1)
    second.committed(1)
    assert first._early.is_set() and second._early.is_set()


def test_without_a_limit_on_space_commits_ask_for_nothing(storage: FilesystemStorage) -> None:
    evictor = Evictor(CacheConfig(max_age=3600), storage, storage.root / "edgeproxy")
    evictor.committed(10**12)
    assert not evictor._early.is_set()
    unlimited = Evictor(CacheConfig(), storage, storage.root / "edgeproxy")
    unlimited.write_failed(OSError(errno.ENOSPC, "No space left on device"))
    assert not unlimited._early.is_set()


def test_an_early_pass_is_not_run_again_at_once(
    storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An early pass is skipped when a pass began after it was asked for (that one saw what
    asked), and waits out the gap after the last pass: one that freed nothing is not run
    again and again."""
    evictor = Evictor(CacheConfig(max_size=0), storage, storage.root / "edgeproxy")
    asked = time.time() - 1
    assert evictor.prune() is not None
    monkeypatch.setattr(eviction, "EARLY_GAP", 0.0)
    monkeypatch.setattr(eviction, "EARLY_GAP_FACTOR", 0.0)
    assert evictor.prune(wait=False, early=asked) is None  # a pass began since
    assert evictor.prune(wait=False, early=time.time()) is not None
    monkeypatch.setattr(eviction, "EARLY_GAP", 3600.0)
    assert evictor.prune(wait=False, early=time.time()) is None  # the gap is not over

"""A blob removed (as eviction removes it) while a client downloads it: the download finishes
whole, warm or cold, because the mirror holds the file open; a fill is never evicted."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from edgeproxy.config import CacheConfig, config_from_dict
from edgeproxy.mirror.app import MirrorApp
from edgeproxy.mirror.eviction import Evictor, Plan
from edgeproxy.mirror.names import resolve_target
from edgeproxy.mirror.storage import FilesystemStorage
from tests.conftest import TEST_TAG
from tests.mirror.fake_upstream import fake_upstream, mirror_of
from tests.support.images import RandomLayer, build_image, push
from tests.support.registry import Registry
from tests.support.servers import serve_app
from tests.support.wait import wait_until

BIG = 48 << 20  # well past the socket buffers and the fill's 8 MiB memory window


def mirror_app(root: Path, upstream_url: str) -> MirrorApp:
    config = config_from_dict(
        {"mirror": {"root": str(root), "upstream": [{"name": "docker.io", "url": upstream_url}]}}
    )
    return MirrorApp(config.mirror)


def read_slowly(response: httpx.Response, between: Callable[[], None]) -> bytes:
    """Read the first MiB, call `between()`, then read the rest."""
    body = bytearray()
    pieces = response.iter_bytes(1 << 20)
    body += next(pieces)
    between()
    for piece in pieces:
        body += piece
    return bytes(body)


@pytest.fixture
def warm_blob(tmp_path: Path) -> Iterator[tuple[FilesystemStorage, str, bytes]]:
    storage = FilesystemStorage(tmp_path / "cache")
    data = RandomLayer(BIG, seed=5)
    image = build_image(tmp_path / "image", TEST_TAG, [data])
    digest = image.layer_digests[0]
    blob = image.blob_path(digest).read_bytes()
    partial = storage.try_begin_blob(digest)
    assert partial is not None
    partial.write(blob)
    partial.commit(len(blob))
    storage.link_blob("test/big", digest)  # as its fill would: the repository it came from
    yield storage, digest, blob


def test_a_warm_download_outlives_the_removal_of_its_blob(
    warm_blob: tuple[FilesystemStorage, str, bytes],
) -> None:
    storage, digest, blob = warm_blob
    app = mirror_app(storage.root, "http://127.0.0.1:9")  # no upstream: served from the cache
    with serve_app(app) as url, httpx.Client(timeout=60) as client:
        with client.stream("GET", f"{url}/v2/test/big/blobs/{digest}") as response:
            assert response.headers["cache-status"] == "edgeproxy; hit"
            body = read_slowly(response, lambda: storage.remove_blobs([digest]))
        assert storage.blob_size(digest) is None
        assert len(body) == len(blob)
        assert hashlib.sha256(body).hexdigest() == digest[7:]


@pytest.mark.e2e
def test_a_cold_download_outlives_the_removal_of_its_fresh_blob(
    registry_none: Registry, tmp_path: Path
) -> None:
    image = build_image(tmp_path / "image", TEST_TAG, [RandomLayer(BIG, seed=6)])
    push(image, registry_none, "test/cold-evicted", TEST_TAG)
    digest = image.layer_digests[0]
    app = mirror_app(tmp_path / "cache", registry_none.url)
    storage = app.storage
    assert isinstance(storage, FilesystemStorage)

    def evict_once_committed() -> None:
        assert wait_until(lambda: storage.blob_size(digest) is not None, timeout=120)
        storage.remove_blobs([digest])

    path = f"/v2/test/cold-evicted/blobs/{digest}"
    with (
        serve_app(app) as url,
        httpx.Client(base_url=url, timeout=120) as client,
        client.stream("GET", path) as response,
    ):
        assert response.headers["cache-status"] == "edgeproxy; fwd=miss"
        body = read_slowly(response, evict_once_committed)
    assert hashlib.sha256(body).hexdigest() == digest[7:]
    assert storage.blob_size(digest) is None


def test_a_fill_in_progress_is_never_evicted(tmp_path: Path) -> None:
    """A fill lives outside the blob store until committed: a pass told to remove everything
    does not see it. (The fake upstream sends half the blob, then stalls.)"""
    data = os.urandom(4 << 20)
    with fake_upstream() as upstream:
        digest = upstream.add_blob(data)
        upstream.faults[digest] = "stall"
        app = mirror_of(upstream, tmp_path / "cache", read_timeout="60s")
        storage = app.storage
        assert isinstance(storage, FilesystemStorage)
        partial = storage.fill_path(digest, "partial")
        evictor = Evictor(CacheConfig(max_size=0), storage, storage.root / "edgeproxy")

        async def fill_and_evict() -> Plan | None:
            target = resolve_target("test/x", None, list(app.config.upstream))
            await app.blobs.fill(app.upstreams["fake"], target, digest)
            half = len(data) // 2
            while not (partial.exists() and partial.stat().st_size >= half):
                await asyncio.sleep(0.01)
            try:
                return await asyncio.to_thread(evictor.prune)
            finally:
                assert partial.stat().st_size == half  # untouched, still being filled
                await app.aclose()

        done = asyncio.run(fill_and_evict())
    assert done is not None and done.blobs == []


@pytest.mark.e2e
def test_a_tag_pulled_again_after_its_eviction_names_a_stored_manifest(
    registry_none: Registry, tmp_path: Path
) -> None:
    """The worker that served a tag keeps its manifest in memory; an eviction then removes it
    from the cache. Pulled again, the tag must name a manifest the cache holds: it named one
    the cache had lost (a tag link no pass ever removed), and another worker, its upstream
    unreachable, then answered 503 for a tag it had just served."""
    image = build_image(tmp_path / "image", TEST_TAG, [RandomLayer(4096, seed=7)])
    push(image, registry_none, "test/evicted-tag", TEST_TAG)
    root = tmp_path / "cache"
    app = mirror_app(root, registry_none.url)
    storage = app.storage
    evictor = Evictor(CacheConfig(max_size=0), storage, root / "edgeproxy")
    path = f"/v2/test/evicted-tag/manifests/{TEST_TAG}"
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get(path, headers=accept).status_code == 200
        done = evictor.prune()
        assert done is not None and done.manifests
        assert storage.read_tag("test/evicted-tag", TEST_TAG) is None
        assert client.get(path, headers=accept).status_code == 200
    digest = image.manifest_digest
    tag = storage.read_tag("test/evicted-tag", TEST_TAG)
    assert tag is not None and tag[0] == digest
    assert storage.read_manifest("test/evicted-tag", digest) is not None
    other = mirror_app(root, "http://127.0.0.1:9")  # another worker, the upstream out of reach
    with serve_app(other) as url, httpx.Client(base_url=url, timeout=30) as client:
        response = client.get(path, headers=accept)
        assert (response.status_code, response.headers["cache-status"]) == (
            200,
            "edgeproxy; hit; detail=stale",
        )

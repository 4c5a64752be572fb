"""`[mirror.cache]` with real pulls (skopeo through edgeproxy from the real registry): the
least recently pulled content goes, shared layers stay, what remains pulls completely with
the upstream stopped, limits apply to content cached before they were set."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy.cli import main
from edgeproxy.config import CacheConfig
from edgeproxy.mirror.eviction import Evictor, scan
from edgeproxy.mirror.storage import FilesystemStorage
from tests.conftest import TEST_TAG
from tests.e2e.test_mirror_pull import pulled_digest, upstream_entry
from tests.support.images import Pushed, build_image, push, random_layer
from tests.support.registry import Registry, start_registry
from tests.support.servers import run_edgeproxy
from tests.support.skopeo import SkopeoError, skopeo
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

LAYER = 300_000  # bytes of random data per layer; an image stores a little more
TEN_DAYS = 10 * 86400


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Registry]:
    """A registry of this test's own, so that it can be stopped."""
    registry = start_registry(tmp_path / "upstream")
    yield registry
    registry.close()


def push_images(upstream: Registry, tmp_path: Path, layers: dict[str, list[bytes]]) -> list[Pushed]:
    return [
        push(build_image(tmp_path / "images" / name, TEST_TAG, parts), upstream, f"test/{name}")
        for name, parts in layers.items()
    ]


def pulls_whole(host: str, item: Pushed, destination: Path) -> bool:
    """`skopeo copy --all` of the image from `host` succeeds with the pushed digest."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        skopeo(
            "copy", "--all", "--src-tls-verify=false", "--src-no-creds", "--preserve-digests",
            f"docker://{host}/{item.repo}:{item.tag}", f"oci:{destination}:v1",
        )  # fmt: skip
    except SkopeoError:
        return False
    return pulled_digest(destination) == item.image.manifest_digest


def storage_of(workdir: Path) -> FilesystemStorage:
    return FilesystemStorage(workdir / "cache")


def fits(storage: FilesystemStorage, cap: int, repositories: list[str]) -> bool:
    """The eviction pass is over: these repositories are left, within the cap."""
    return storage.repositories() == repositories and scan(storage).size <= cap


def test_past_max_size_the_oldest_image_goes_and_the_rest_pull_from_the_cache(
    upstream: Registry, tmp_path: Path
) -> None:
    pushed = push_images(
        upstream, tmp_path, {f"img{i}": [random_layer(LAYER, seed=100 + i)] for i in range(3)}
    )
    cap = 2 * LAYER + 100_000  # two images fit, three do not
    workdir = tmp_path / "mirror"
    cache: dict[str, Any] = {"max_size": cap, "interval": "0.2s"}
    with run_edgeproxy(workdir, [upstream_entry(upstream)], cache=cache) as mirror:
        for item in pushed:
            assert pulls_whole(mirror.host, item, tmp_path / "cold" / item.repo)
        storage = storage_of(workdir)
        assert wait_until(lambda: fits(storage, cap, ["test/img1", "test/img2"]))
        assert wait_until(lambda: "evicted 1 manifests and 3 blobs" in mirror.log())
        assert mirror.log().count("edgeproxy.eviction") == 1  # one pass, by one of the workers
        upstream.stop()  # what is left must come from the cache alone
        for item in pushed[1:]:
            assert pulls_whole(mirror.host, item, tmp_path / "warm" / item.repo)
        assert not pulls_whole(mirror.host, pushed[0], tmp_path / "gone")


def test_a_layer_shared_with_an_evicted_image_stays_for_the_other(
    upstream: Registry, tmp_path: Path
) -> None:
    shared, own_a, own_b = (random_layer(LAYER, seed=s) for s in (200, 201, 202))
    a, b = push_images(upstream, tmp_path, {"a": [shared, own_a], "b": [shared, own_b]})
    cap = 2 * LAYER + 50_000  # b with the shared layer fits; a's own layer does not
    workdir = tmp_path / "mirror"
    cache: dict[str, Any] = {"max_size": cap, "interval": "0.2s"}
    with run_edgeproxy(workdir, [upstream_entry(upstream)], cache=cache) as mirror:
        assert pulls_whole(mirror.host, a, tmp_path / "a")
        assert pulls_whole(mirror.host, b, tmp_path / "b")
        storage = storage_of(workdir)
        assert wait_until(lambda: fits(storage, cap, ["test/b"]))
        shared_digest = a.image.layer_digests[0]
        own_a_digest = a.image.layer_digests[1]
        assert storage.blob_size(shared_digest) is not None
        assert storage.blob_size(own_a_digest) is None
        upstream.stop()
        assert pulls_whole(mirror.host, b, tmp_path / "b-again")
    # What eviction left is still registry:2's layout: registry:2 serves it as its own.
    shutil.copytree(workdir / "cache", tmp_path / "registry2" / "storage")
    registry2 = start_registry(tmp_path / "registry2")
    try:
        assert pulls_whole(registry2.host, b, tmp_path / "b-from-registry2")
        assert not pulls_whole(registry2.host, a, tmp_path / "a-from-registry2")
    finally:
        registry2.close()


def test_a_lowered_limit_applies_to_content_cached_before(
    upstream: Registry, tmp_path: Path
) -> None:
    pushed = push_images(
        upstream, tmp_path, {f"old{i}": [random_layer(LAYER, seed=300 + i)] for i in range(3)}
    )
    workdir = tmp_path / "mirror"
    with run_edgeproxy(workdir, [upstream_entry(upstream)]) as mirror:  # no limits yet
        for item in pushed:
            assert pulls_whole(mirror.host, item, tmp_path / "cold" / item.repo)
    storage = storage_of(workdir)
    assert len(storage.repositories()) == 3
    cap = LAYER + 50_000
    cache: dict[str, Any] = {"max_size": cap, "interval": "0.2s"}
    with run_edgeproxy(workdir, [upstream_entry(upstream)], cache=cache) as mirror:
        assert wait_until(lambda: fits(storage, cap, ["test/old2"]))
        upstream.stop()
        assert pulls_whole(mirror.host, pushed[2], tmp_path / "warm")


def backdate(root: Path, seconds: float, folders: bool = False) -> None:
    """Make everything in the cache look written (and last pulled) `seconds` ago; its
    folders too, with `folders` (last changed then)."""
    stamp = os.path.getmtime(root) - seconds
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            os.utime(Path(folder) / name, (stamp, stamp))
        if folders:
            os.utime(folder, (stamp, stamp))


def test_max_age_counts_from_the_last_pull(
    upstream: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = push_images(
        upstream, tmp_path, {"a": [random_layer(LAYER, seed=400)], "b": [random_layer(1, 401)]}
    )
    workdir = tmp_path / "mirror"
    # The limit is the operator's (`cache prune`); the server's own pass is hours away.
    cache: dict[str, Any] = {"max_age": "168h", "interval": "1h"}
    with run_edgeproxy(workdir, [upstream_entry(upstream)], cache=cache) as mirror:
        assert pulls_whole(mirror.host, a, tmp_path / "a")
        assert pulls_whole(mirror.host, b, tmp_path / "b")
    backdate(workdir / "cache", TEN_DAYS)  # both were last pulled ten days ago ...
    with run_edgeproxy(workdir, [upstream_entry(upstream)], cache=cache) as mirror:
        assert pulls_whole(mirror.host, a, tmp_path / "a-again")  # ... and a again now
        config = ["--config", str(mirror.config_path)]
        capsys.readouterr()
        assert main(["cache", "prune", "--dry-run", *config]) == 0
        dry = capsys.readouterr().out
        assert f"would remove manifest test/b@{b.image.manifest_digest} (tags: v1)" in dry
        assert "test/a@" not in dry
        assert storage_of(workdir).repositories() == ["test/a", "test/b"]
        assert main(["cache", "prune", *config]) == 0
        assert "removed 1 manifests, 3 blobs" in capsys.readouterr().out
        assert storage_of(workdir).repositories() == ["test/a"]
        assert main(["cache", "ls", *config]) == 0
        listing = capsys.readouterr().out
        assert "test/a" in listing and "test/b" not in listing
        upstream.stop()
        assert pulls_whole(mirror.host, a, tmp_path / "a-warm")
        assert not pulls_whole(mirror.host, b, tmp_path / "b-gone")


def test_the_sweep_removes_folders_no_reader_can_use(upstream: Registry, tmp_path: Path) -> None:
    """What a kill, a full disk or an eviction of blob links leaves: a tag folder without its
    current link (registry:2 lists such a tag, then answers 404 for it), a repository whose
    folders hold no file (an empty `_manifests` was in edgeproxy's catalog, an empty
    `_layers` in registry:2's). Once an hour old, the sweep removes them. A repository with
    manifests keeps its empty folders: registry:2 finds repositories by `_layers`, and
    answers the list of an empty `tags` folder (a 404 without one)."""
    (a,) = push_images(upstream, tmp_path, {"a": [random_layer(1000, seed=410)]})
    workdir = tmp_path / "mirror"
    with run_edgeproxy(workdir, [upstream_entry(upstream)]) as mirror:
        assert pulls_whole(mirror.host, a, tmp_path / "a")
    storage = storage_of(workdir)
    repositories = storage.root / "docker/registry/v2/repositories"
    manifest = a.image.manifest_digest
    for name in ("test/a", "test/ghost-only"):
        index = repositories / name / "_manifests/tags/ghost/index/sha256" / manifest[7:]
        index.mkdir(parents=True)
        (index / "link").write_text(manifest)
    (repositories / "test/a/_manifests/tags/bare/current").mkdir(parents=True)
    (repositories / "test/ghost-only/_layers").mkdir(parents=True)
    (repositories / "test/links-evicted/_layers/sha256").mkdir(parents=True)
    (repositories / "test/killed/_manifests/revisions/sha256" / manifest[7:]).mkdir(parents=True)
    (repositories / "test/tag-only/_manifests/tags/v1/current").mkdir(parents=True)
    (repositories / "test/tag-only/_layers").mkdir(parents=True)
    storage.write_manifest("test/no-tag", manifest, storage.open_blob(manifest).read(0, 1 << 20))
    (repositories / "test/no-tag/_manifests/tags").mkdir()
    backdate(storage.root, 2 * 3600, folders=True)
    assert Evictor(CacheConfig(), storage, storage.root / "edgeproxy").prune() is not None
    assert storage.repositories() == ["test/a", "test/no-tag"]
    registry = start_registry(tmp_path / "registry2", storage=storage.root)
    try:
        with httpx.Client(base_url=registry.url) as client:
            catalog = client.get("/v2/_catalog").json()["repositories"]
            assert catalog == ["test/a", "test/no-tag"]
            assert client.get("/v2/test/a/tags/list").json()["tags"] == ["v1"]
            accept = {"Accept": a.image.media_type}
            assert client.get("/v2/test/a/manifests/v1", headers=accept).status_code == 200
            assert client.get("/v2/test/no-tag/tags/list").status_code == 200
    finally:
        registry.close()

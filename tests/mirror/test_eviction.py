"""Eviction decided on a real FilesystemStorage: LRU past max_size, max_age from the last pull,
references kept, open readers never cut, one evictor at a time."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from edgeproxy.config import CacheConfig
from edgeproxy.mirror.eviction import Evictor, Inventory, Plan, execute, plan, references, scan
from edgeproxy.mirror.pulls import PullRecorder
from edgeproxy.mirror.storage import FilesystemStorage
from tests.support.disk import fill_up, small_tmpfs

HOUR = 3600.0
DAY = 86400.0
NOW = time.time()
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put_blob(storage: FilesystemStorage, data: bytes, age: float) -> str:
    digest = digest_of(data)
    if storage.blob_size(digest) is None:
        partial = storage.try_begin_blob(digest)
        assert partial is not None
        partial.write(data)
        partial.commit(len(data))
    os.utime(storage.blob_path(digest), (NOW - age, NOW - age))
    return digest


def put_manifest(
    storage: FilesystemStorage, name: str, document: Mapping[str, object], age: float, tag: str = ""
) -> str:
    data = json.dumps(document).encode()
    digest = digest_of(data)
    storage.write_manifest(name, digest, data)
    if tag:
        storage.write_tag(name, tag, digest)
    stamp = (NOW - age, NOW - age)
    os.utime(storage.blob_path(digest), stamp)
    link = storage.root / "docker/registry/v2/repositories" / name / "_manifests/revisions"
    os.utime(link / "sha256" / digest[7:] / "link", stamp)
    return digest


def put_image(
    storage: FilesystemStorage, name: str, layers: list[bytes], age: float, tag: str = "v1"
) -> str:
    diff_ids = [digest_of(layer) for layer in layers]
    config = put_blob(storage, json.dumps({"name": name, "diff_ids": diff_ids}).encode(), age)
    descriptors = []
    for layer in layers:
        digest = put_blob(storage, layer, age)
        storage.link_blob(name, digest)
        descriptors.append({"digest": digest, "size": len(layer)})
    document = {"mediaType": MANIFEST, "config": {"digest": config}, "layers": descriptors}
    return put_manifest(storage, name, document, age, tag)


@pytest.fixture
def storage(tmp_path: Path) -> FilesystemStorage:
    return FilesystemStorage(tmp_path / "cache")


def removed(storage: FilesystemStorage, limits: CacheConfig) -> tuple[set[str], set[str]]:
    """(repositories whose manifests go, blob digests that go)."""
    inventory = scan(storage)
    planned = plan(inventory, limits, NOW)
    if limits.max_size is not None:
        assert planned.size_after <= limits.max_size
    return {e.manifest.name for e in planned.manifests}, {b.digest for b in planned.blobs}


def test_references_of_every_manifest_kind() -> None:
    image = {"config": {"digest": "sha256:c"}, "layers": [{"digest": "sha256:l"}]}
    assert references(json.dumps(image).encode()) == {"sha256:c", "sha256:l"}
    index = {"manifests": [{"digest": "sha256:a"}, {"digest": "sha256:b"}]}
    assert references(json.dumps(index).encode()) == {"sha256:a", "sha256:b"}
    schema1 = {"schemaVersion": 1, "fsLayers": [{"blobSum": "sha256:x"}]}
    assert references(json.dumps(schema1).encode()) == {"sha256:x"}
    assert references(b"not json") == frozenset()


@pytest.mark.parametrize(
    "document",
    [
        {"fsLayers": 1},  # not a list
        {"layers": [{"digest": []}]},  # a digest that is no string (nor hashable)
        {"fsLayers": [{"blobSum": {}}]},
        {"manifests": "sha256:a", "config": ["sha256:b"]},
    ],
)
def test_a_manifest_of_any_shape_never_stops_the_eviction(
    storage: FilesystemStorage, document: dict[str, object]
) -> None:
    """An upstream's manifest needs only be a JSON object to be served and cached: one whose
    fields had another type failed every eviction pass (TypeError), so the cache outgrew
    max_size and max_age for as long as that manifest stayed, which was for ever."""
    assert references(json.dumps(document).encode()) == frozenset()
    put_manifest(storage, "odd", document, age=10 * DAY)
    put_image(storage, "old", [os.urandom(100)], age=10 * DAY)
    evictor = Evictor(CacheConfig(max_age=7 * DAY), storage, storage.root / "edgeproxy")
    assert evictor.prune() is not None
    assert storage.repositories() == []


def test_past_max_size_the_least_recently_pulled_goes(storage: FilesystemStorage) -> None:
    put_image(storage, "old", [os.urandom(1000)], age=3 * DAY)
    put_image(storage, "mid", [os.urandom(1000)], age=2 * DAY)
    put_image(storage, "new", [os.urandom(1000)], age=1 * DAY)
    total = scan(storage).size
    names, _ = removed(storage, CacheConfig(max_size=total - 1))
    assert names == {"old"}
    names, _ = removed(storage, CacheConfig(max_size=total // 2))
    assert names == {"old", "mid"}
    assert removed(storage, CacheConfig(max_size=total)) == (set(), set())


def test_with_less_than_min_free_free_the_least_recently_pulled_goes(
    storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_image(storage, "old", [os.urandom(1000)], age=3 * DAY)
    put_image(storage, "mid", [os.urandom(1000)], age=2 * DAY)
    put_image(storage, "new", [os.urandom(1000)], age=1 * DAY)
    monkeypatch.setattr(storage, "free_space", lambda: 10_000)
    assert removed(storage, CacheConfig(min_free=10_000)) == (set(), set())
    names, _ = removed(storage, CacheConfig(min_free=10_001))
    assert names == {"old"}
    names, _ = removed(storage, CacheConfig(min_free=11_500))
    assert names == {"old", "mid"}
    # The limits add up: what either asks for goes.
    names, _ = removed(storage, CacheConfig(min_free=10_001, max_size=scan(storage).size // 2))
    assert names == {"old", "mid"}


def test_prune_keeps_min_free_on_a_full_file_system(tmp_path: Path) -> None:
    """The file system really full (statvfs), other files than the cache's filling it:
    removing the least recently pulled content frees `min_free`."""
    with small_tmpfs(tmp_path / "small") as root:
        storage = FilesystemStorage(root)
        put_image(storage, "old", [os.urandom(3 << 20)], age=3 * DAY)
        put_image(storage, "mid", [os.urandom(3 << 20)], age=2 * DAY)
        put_image(storage, "new", [os.urandom(3 << 20)], age=1 * DAY)
        fill_up(root / "filler")
        assert storage.free_space() < 1 << 20
        limits = CacheConfig(min_free="4m")
        assert Evictor(limits, storage, root / "edgeproxy").prune() is not None
        assert storage.repositories() == ["new"]
        assert storage.free_space() >= 4 << 20


def test_a_shared_layer_stays_while_a_kept_image_uses_it(storage: FilesystemStorage) -> None:
    shared, own = os.urandom(5000), os.urandom(5000)
    put_image(storage, "a", [shared, own], age=3 * DAY)
    put_image(storage, "b", [shared], age=1 * DAY)
    names, blobs = removed(storage, CacheConfig(max_age=2 * DAY))
    assert names == {"a"}
    assert digest_of(own) in blobs
    assert digest_of(shared) not in blobs


def test_max_age_counts_from_the_last_pull(storage: FilesystemStorage) -> None:
    put_image(storage, "a", [os.urandom(100)], age=10 * DAY)
    manifest = put_image(storage, "b", [os.urandom(100)], age=10 * DAY)
    storage.record_manifest_pull("b", manifest)  # pulled again just now
    names, blobs = removed(storage, CacheConfig(max_age=7 * DAY))
    assert names == {"a"}
    assert len(blobs) == 3  # a's manifest, config and layer


def test_an_index_keeps_its_children_and_their_blobs(storage: FilesystemStorage) -> None:
    amd64 = put_image(storage, "multi", [os.urandom(100)], age=9 * DAY, tag="")
    arm64 = put_image(storage, "multi", [os.urandom(100)], age=9 * DAY, tag="")
    index = {"mediaType": INDEX, "manifests": [{"digest": amd64}, {"digest": arm64}]}
    put_manifest(storage, "multi", index, age=1 * DAY, tag="v1")  # pulled recently
    assert removed(storage, CacheConfig(max_age=7 * DAY)) == (set(), set())
    names, blobs = removed(storage, CacheConfig(max_age=0.5 * DAY))
    assert names == {"multi"}
    assert len(blobs) == 7  # the index, 2 manifests, 2 configs, 2 layers


def test_a_blob_no_manifest_references_goes_by_its_own_last_pull(
    storage: FilesystemStorage,
) -> None:
    old, recent = put_blob(storage, b"old" * 100, age=10 * DAY), put_blob(storage, b"new", age=0)
    put_image(storage, "a", [os.urandom(1000)], age=DAY)
    assert removed(storage, CacheConfig(max_age=7 * DAY)) == (set(), {old})
    assert removed(storage, CacheConfig(max_size=scan(storage).size - 1)) == (set(), {old})
    everything = plan(scan(storage), CacheConfig(max_size=0), NOW).blobs
    assert [everything[0].digest, everything[-1].digest] == [old, recent]  # oldest first


def test_prune_removes_content_and_keeps_the_layout_consistent(storage: FilesystemStorage) -> None:
    shared = os.urandom(2000)
    put_image(storage, "team/a", [shared, os.urandom(2000)], age=10 * DAY)
    put_image(storage, "team/b", [shared], age=1 * DAY)
    evictor = Evictor(CacheConfig(max_age=7 * DAY), storage, storage.root / "edgeproxy")
    dry = evictor.prune(dry_run=True)
    assert dry is not None and len(dry.blobs) == 3
    assert storage.repositories() == ["team/a", "team/b"]
    done = evictor.prune()
    assert done is not None and len(done.manifests) == 1 and len(done.blobs) == 3
    assert storage.repositories() == ["team/b"]
    assert storage.list_tags("team/a") == []
    assert storage.blob_size(digest_of(shared)) == len(shared)
    repos = storage.root / "docker/registry/v2/repositories"
    assert not (repos / "team/a").exists()
    linked = list((repos / "team/b/_layers/sha256").iterdir())
    assert [p.name for p in linked] == [digest_of(shared)[7:]]
    assert done.size_after == scan(storage).size
    assert scan(storage).entries[0].manifest.tags == ("v1",)


def test_an_open_blob_reads_on_after_its_removal(storage: FilesystemStorage) -> None:
    data = os.urandom(3 << 20)
    digest = put_blob(storage, data, age=0)
    reader = storage.open_blob(digest)
    storage.remove_blobs([digest])
    assert storage.blob_size(digest) is None
    assert reader.size == len(data)
    assert reader.read(0, len(data)) == data
    reader.close()


def test_content_pulled_after_the_scan_is_not_removed(storage: FilesystemStorage) -> None:
    manifest = put_image(storage, "a", [os.urandom(100)], age=10 * DAY)
    inventory = scan(storage)
    planned = plan(inventory, CacheConfig(max_age=7 * DAY), inventory.taken)
    time.sleep(0.01)
    storage.record_manifest_pull("a", manifest)
    done = execute(storage, planned, inventory.taken)
    assert (done.manifests, done.blobs) == ([], [])
    assert storage.repositories() == ["a"]


def test_an_index_pulled_after_the_scan_keeps_its_children(storage: FilesystemStorage) -> None:
    children = [put_image(storage, "multi", [os.urandom(100)], age=9 * DAY, tag="") for _ in "ab"]
    document = {"mediaType": INDEX, "manifests": [{"digest": d} for d in children]}
    index = put_manifest(storage, "multi", document, age=9 * DAY, tag="v1")
    inventory = scan(storage)
    planned = plan(inventory, CacheConfig(max_age=7 * DAY), inventory.taken)
    assert len(planned.manifests) == 3
    time.sleep(0.01)
    storage.record_manifest_pull("multi", index)  # `docker pull multi:v1`, just then
    done = execute(storage, planned, inventory.taken)
    assert (done.manifests, done.blobs) == ([], [])
    assert all(storage.read_manifest("multi", d) is not None for d in children)


def test_a_manifest_stored_after_the_scan_keeps_its_layers(storage: FilesystemStorage) -> None:
    """A pull of a new image sharing an old image's layer, while a pass runs: the new manifest
    (stored after the scan, so not in the plan) lost its layer, and with the upstream down
    the cache served a manifest it could not serve the layers of."""
    layer = os.urandom(100)
    put_image(storage, "old", [layer], age=10 * DAY)
    inventory = scan(storage)
    planned = plan(inventory, CacheConfig(max_age=7 * DAY), inventory.taken)
    assert digest_of(layer) in {blob.digest for blob in planned.blobs}
    new = put_image(storage, "new", [layer], age=0)
    link = storage.root / "docker/registry/v2/repositories/new/_manifests/revisions/sha256"
    os.utime(link / new[7:] / "link", (inventory.taken + 1, inventory.taken + 1))  # just stored
    execute(storage, planned, inventory.taken)
    assert storage.blob_size(digest_of(layer)) == 100
    assert storage.blob_linked("new", digest_of(layer))


def test_a_manifest_stored_while_the_pass_removes_keeps_its_layers(
    storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same pull, its manifest stored while the pass was removing manifests (after it
    looked for new ones): the blobs go last, so they must be checked against it then."""
    layer = os.urandom(100)
    put_image(storage, "old", [layer], age=10 * DAY)
    inventory = scan(storage)
    planned = plan(inventory, CacheConfig(max_age=7 * DAY), inventory.taken)
    remove_manifest = storage.remove_manifest

    def pulled_meanwhile(name: str, digest: str) -> None:
        remove_manifest(name, digest)
        new = put_image(storage, "new", [layer], age=0)
        link = storage.root / "docker/registry/v2/repositories/new/_manifests/revisions/sha256"
        os.utime(link / new[7:] / "link", (inventory.taken + 1, inventory.taken + 1))

    monkeypatch.setattr(storage, "remove_manifest", pulled_meanwhile)
    execute(storage, planned, inventory.taken)
    assert storage.blob_size(digest_of(layer)) == 100
    assert storage.blob_linked("new", digest_of(layer))


def an_old_image_planned_away(storage: FilesystemStorage) -> tuple[str, bytes, Inventory, Plan]:
    """An image past max_age: its manifest, bytes, the pass's inventory and its plan."""
    manifest = put_image(storage, "a", [os.urandom(100)], age=10 * DAY)
    data = storage.read_manifest("a", manifest)
    assert data is not None
    inventory = scan(storage)
    return manifest, data, inventory, plan(inventory, CacheConfig(max_age=7 * DAY), inventory.taken)


def test_a_manifest_stored_again_while_the_pass_removes_it_stays_whole(
    storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker pulls an image the pass is removing, after the pass looked for new pulls but
    before its blobs go: the worker found the manifest's bytes in place (not written again)
    and linked them, then the pass removed them. The tag and revision link named bytes the
    cache had lost (with the upstream down, a 503 for an image just pulled)."""
    manifest, data, inventory, planned = an_old_image_planned_away(storage)
    remove_blobs = storage.remove_blobs

    def pulled_meanwhile(digests: list[str]) -> None:
        storage.write_manifest("a", manifest, data)
        storage.write_tag("a", "v1", manifest)
        remove_blobs(digests)

    monkeypatch.setattr(storage, "remove_blobs", pulled_meanwhile)
    done = execute(storage, planned, inventory.taken)
    assert manifest not in {blob.digest for blob in done.blobs}
    assert storage.read_tag("a", "v1") is not None
    assert storage.read_manifest("a", manifest) == data


def test_a_manifest_linked_just_after_the_pass_removed_it_stays_whole(
    storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race, the other way round: the worker found the bytes in place, the pass then
    removed them (and saw no link to them), and the worker linked them after."""
    manifest, data, inventory, planned = an_old_image_planned_away(storage)
    blob_size = storage.blob_size
    passes: list[Plan] = []

    def pass_runs_after_the_look(digest: str) -> int | None:
        size = blob_size(digest)
        if digest == manifest and not passes:
            passes.append(execute(storage, planned, inventory.taken))
        return size

    monkeypatch.setattr(storage, "blob_size", pass_runs_after_the_look)
    storage.write_manifest("a", manifest, data)
    storage.write_tag("a", "v1", manifest)
    assert manifest in {blob.digest for blob in passes[0].blobs}
    assert storage.read_manifest("a", manifest) == data


def test_one_evictor_at_a_time(storage: FilesystemStorage) -> None:
    put_image(storage, "a", [os.urandom(100)], age=10 * DAY)
    evictor = Evictor(CacheConfig(max_age=7 * DAY), storage, storage.root / "edgeproxy")
    with open(storage.root / "edgeproxy" / "evict.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert evictor.prune(wait=False) is None  # another process is at it
    assert evictor.prune(wait=False) is not None
    assert evictor.prune(wait=False) is None  # done less than half an interval ago
    assert storage.repositories() == []


def test_pulls_are_recorded_at_most_once_a_minute(storage: FilesystemStorage) -> None:
    digest = put_blob(storage, b"x" * 10, age=DAY)
    recorder = PullRecorder(storage)
    recorder.blob("x", digest)
    first = storage.blob_last_pull(digest)
    assert first is not None and first > NOW - 60
    os.utime(storage.blob_path(digest), (NOW - DAY, NOW - DAY))
    recorder.blob("x", digest)  # within the minute: no write
    assert storage.blob_last_pull(digest) == pytest.approx(NOW - DAY)


def test_recording_a_pull_never_fails_the_pull(storage: FilesystemStorage) -> None:
    """The link cannot be written (here: a file where its folder should be; in real life a
    read-only or full disk): the pull is still recorded and nothing is raised."""
    digest = put_blob(storage, b"ro" * 10, age=DAY)
    (storage.root / "docker/registry/v2/repositories/blocked").write_text("")
    storage.record_blob_pull("blocked/repo", digest)
    last_pull = storage.blob_last_pull(digest)
    assert last_pull is not None and last_pull > NOW - 60


def test_evicting_a_repository_keeps_the_one_nested_in_it(storage: FilesystemStorage) -> None:
    """registry:2's layout puts `team/app/sidecar` inside `team/app`'s folder: evicting the
    last image of `team/app` used to remove the folder, the fresh `team/app/sidecar` too."""
    put_image(storage, "team/app", [b"old layer"], age=30 * DAY)
    fresh = put_image(storage, "team/app/sidecar", [b"fresh layer"], age=0)
    done = Evictor(CacheConfig(max_age=7 * DAY), storage, storage.root / "edgeproxy").prune()
    assert done is not None
    assert [entry.manifest.name for entry in done.manifests] == ["team/app"]
    assert storage.read_tag("team/app/sidecar", "v1") is not None
    assert storage.read_manifest("team/app/sidecar", fresh) is not None
    assert storage.repositories() == ["team/app/sidecar"]


def aged(path: Path, seconds: float) -> Path:
    """Date `path` `seconds` back, as a leftover of a process killed that long ago."""
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))
    return path


def sweep(storage: FilesystemStorage) -> Plan | None:
    """A pass without limits: only the sweeps."""
    return Evictor(CacheConfig(), storage, storage.root / "edgeproxy").prune()


def test_empty_blob_folders_a_kill_left_go_once_old(storage: FilesystemStorage) -> None:
    """A SIGKILL between a commit's mkdir and its rename (or in an eviction's rmtree) leaves
    an empty blob folder that no pass or verify ever saw: one over an hour old goes, then its
    prefix folder (made new by that) on a later pass; a young one may be a commit's."""
    image = put_image(storage, "a", [b"layer"], age=10 * DAY)
    blobs = storage.root / "docker/registry/v2/blobs/sha256"
    dead = blobs / "ab" / ("ab" + "0" * 62)
    dead.mkdir(parents=True)
    aged(dead, 2 * HOUR)
    young = blobs / "cd" / ("cd" + "1" * 62)
    young.mkdir(parents=True)
    assert sweep(storage) == Plan([], [], 0, 0)
    assert not dead.exists() and dead.parent.exists()
    aged(dead.parent, 2 * HOUR)
    sweep(storage)
    assert not dead.parent.exists()
    assert young.is_dir()
    assert storage.read_manifest("a", image) is not None  # old folders holding data stay
    assert storage.blob_size(digest_of(b"layer")) == len(b"layer")


def test_young_folders_of_a_repository_stay(storage: FilesystemStorage) -> None:
    """A tag folder whose current link is about to be written, a `_layers` made for a
    manifest about to be linked: the sweep never removes what a writer is at."""
    repositories = storage.root / "docker/registry/v2/repositories"
    made = [repositories / "a/_manifests/tags/v1/index/sha256", repositories / "b/_layers"]
    for folder in made:
        folder.mkdir(parents=True)
    sweep(storage)
    assert all(folder.is_dir() for folder in made)


def test_temporaries_of_killed_writes_go_once_old(storage: FilesystemStorage) -> None:
    """A SIGKILL mid atomic write (a manifest's data, a tag's or revision's link, a fill's
    size) leaves `.<name>.<hex>.tmp`, up to 4 MiB: one over an hour old goes, a young one may
    be a write going on."""
    image = put_image(storage, "a", [b"layer"], age=10 * DAY)
    tag = storage.root / "docker/registry/v2/repositories/a/_manifests/tags/v1/current"
    dead = [
        storage.blob_path(image).parent / ".data.0123456789ab.tmp",
        tag / ".link.0123456789ab.tmp",
        storage.fill_path("sha256:" + "e" * 64, "size").with_name(
            f".sha256-{'e' * 64}.size.0123456789ab.tmp"
        ),
    ]
    for path in dead:
        path.write_bytes(b"{}")
        aged(path, 2 * HOUR)
    young = storage.blob_path(image).parent / ".data.ba9876543210.tmp"
    young.write_bytes(b"{}")
    sweep(storage)
    assert [path for path in dead if path.exists()] == []
    assert young.exists()
    assert storage.read_tag("a", "v1") is not None
    assert storage.read_manifest("a", image) is not None


def test_a_tag_written_just_after_its_manifest_was_evicted_goes(
    storage: FilesystemStorage,
) -> None:
    """The race: a worker saw the revision, a pass removed it with its tags, the worker then
    wrote the tag. Nothing removed that tag (a pull by it with the upstream down: 503, not
    404); a sweep does, and its repository when it was the last thing there. A tag whose
    revision exists stays."""
    gone = put_image(storage, "a", [b"gone"], age=DAY, tag="old")
    kept = put_image(storage, "a", [b"kept"], age=DAY, tag="new")
    storage.remove_manifest("a", gone)
    storage.write_tag("a", "old", gone)
    assert storage.list_tags("a") == ["new", "old"]
    sweep(storage)
    assert storage.list_tags("a") == ["new"]
    assert storage.read_tag("a", "new") is not None
    assert storage.read_manifest("a", kept) is not None
    storage.remove_manifest("a", kept)
    storage.write_tag("a", "new", kept)
    assert storage.repositories() == ["a"]
    sweep(storage)
    assert storage.repositories() == []


def test_without_limits_the_workers_sweep_once_an_hour(storage: FilesystemStorage) -> None:
    """Caches without `[mirror.cache]` limits get killed workers too: every worker runs the
    loop, whose pass sweeps when the last sweep is an hour old (a walk of the whole cache)."""
    fills = storage.root / "edgeproxy" / "fills"
    first, second = fills / ".x.0123456789ab.tmp", fills / ".y.0123456789ab.tmp"
    first.write_bytes(b"")
    aged(first, 2 * HOUR)

    async def start() -> None:
        evictor = Evictor(CacheConfig(interval=0.01), storage, storage.root / "edgeproxy")
        evictor.start()
        try:
            for _ in range(500):
                if not first.exists():
                    break
                await asyncio.sleep(0.01)
            second.write_bytes(b"")  # another kill's, swept an hour later
            aged(second, 2 * HOUR)
            await asyncio.sleep(0.2)  # passes run, and skip the sweep: it is not an hour old
            assert second.exists()
            aged(storage.root / "edgeproxy" / "swept", 2 * HOUR)
            for _ in range(500):
                if not second.exists():
                    break
                await asyncio.sleep(0.01)
        finally:
            await evictor.aclose()

    asyncio.run(start())
    assert not first.exists() and not second.exists()

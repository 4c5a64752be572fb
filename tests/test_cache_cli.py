"""`edgeproxy cache warm|verify|ls|du` against a cache filled from the real registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy import cache_cli
from edgeproxy.cli import main
from edgeproxy.mirror.storage import FilesystemStorage
from tests.conftest import TEST_TAG
from tests.e2e.test_mirror_pull import pull, pulled_digest, upstream_entry
from tests.mirror.fake_upstream import MANIFEST_TYPE, digest_of, fake_upstream
from tests.support.images import build_image, build_index, push, random_layer
from tests.support.registry import Registry, start_registry
from tests.support.servers import WITHOUT_DAC, run_edgeproxy, write_toml

pytestmark = pytest.mark.e2e


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Registry]:
    """A registry of this test's own, so that it can be stopped."""
    registry = start_registry(tmp_path / "upstream")
    yield registry
    registry.close()


def config_file(tmp_path: Path, upstream: Registry) -> list[str]:
    """`--config FILE` for a mirror of `upstream` cached in tmp_path/mirror/cache."""
    mirror = {"root": str(tmp_path / "mirror" / "cache"), "upstream": [upstream_entry(upstream)]}
    return ["--config", str(write_toml(tmp_path / "cli.toml", {"mirror": mirror}))]


def test_warm_then_pull_with_the_upstream_stopped(
    upstream: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = build_index(tmp_path / "index", TEST_TAG, [("linux", "amd64"), ("linux", "arm64")])
    single = build_image(tmp_path / "single", TEST_TAG, [random_layer(500_000, seed=7)])
    push(index, upstream, "test/multi")
    push(single, upstream, "test/single")
    config = config_file(tmp_path, upstream)
    assert main(["cache", "warm", *config, "test/multi:v1", "docker.io/test/single:v1"]) == 0
    err = capsys.readouterr().err
    assert "test/multi:v1: 4 blobs cached" in err  # 2 platforms: a config and a layer each
    assert "docker.io/test/single:v1: 2 blobs cached" in err
    assert main(["cache", "warm", *config, "test/nothing:v1"]) == 1
    upstream.stop()
    with run_edgeproxy(tmp_path / "mirror", [upstream_entry(upstream)]) as mirror:
        pull(mirror, "test/multi:v1", tmp_path / "multi")  # every platform
        pull(mirror, "test/single:v1", tmp_path / "single-pulled")
    assert pulled_digest(tmp_path / "multi") == index.manifest_digest
    assert pulled_digest(tmp_path / "single-pulled") == single.manifest_digest
    assert main(["cache", "ls", *config]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[1].startswith("test/multi") and " v1 " in listing[1]
    assert listing[2].startswith("test/single")
    assert main(["cache", "du", *config]) == 0
    assert "total: 10 blobs (0 used by no manifest" in capsys.readouterr().out


def test_warm_one_platform(upstream: Registry, tmp_path: Path) -> None:
    index = build_index(tmp_path / "index", TEST_TAG, [("linux", "amd64"), ("linux", "arm64")])
    push(index, upstream, "test/multi")
    config = config_file(tmp_path, upstream)
    assert main(["cache", "warm", *config, "--platform", "linux/arm64", "test/multi"]) == 1
    assert main(["cache", "warm", *config, "--platform", "linux/arm64", "test/multi:v1"]) == 0
    storage = FilesystemStorage(tmp_path / "mirror" / "cache")
    amd64, arm64 = index.children
    assert all(storage.blob_size(d) is not None for d in arm64.layer_digests)
    assert all(storage.blob_size(d) is None for d in amd64.layer_digests)


def test_verify_finds_a_flipped_byte_and_remove_makes_a_pull_refetch_it(
    registry_none: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = build_image(tmp_path / "image", TEST_TAG, [random_layer(200_000, seed=8)])
    push(image, registry_none, "test/verify")
    config = config_file(tmp_path, registry_none)
    assert main(["cache", "warm", *config, "test/verify:v1"]) == 0
    assert main(["cache", "verify", *config]) == 0
    assert "checked 3 blobs: 0 corrupt, 0 unreadable" in capsys.readouterr().out
    layer = image.layer_digests[0]
    storage = FilesystemStorage(tmp_path / "mirror" / "cache")
    with storage.blob_path(layer).open("r+b") as data:
        data.seek(100_000)
        byte = data.read(1)
        data.seek(100_000)
        data.write(bytes([byte[0] ^ 0xFF]))
    assert main(["cache", "verify", *config]) == 1
    assert f"corrupt: {layer}" in capsys.readouterr().out
    assert storage.blob_size(layer) is not None  # reported, not removed
    assert main(["cache", "verify", "--remove", *config]) == 0
    assert f"removed: {layer}" in capsys.readouterr().out
    assert storage.blob_size(layer) is None
    before = registry_none.count("GET", f"/blobs/{layer}")
    with run_edgeproxy(tmp_path / "mirror", [upstream_entry(registry_none)]) as mirror:
        response = httpx.get(f"{mirror.url}/v2/test/verify/blobs/{layer}", timeout=60)
    assert response.content == image.blob_path(layer).read_bytes()
    assert registry_none.wait_count("GET", f"/blobs/{layer}", before + 1) == before + 1
    assert main(["cache", "verify", *config]) == 0


def test_verify_reports_a_blob_it_cannot_read_and_goes_on(tmp_path: Path) -> None:
    """A failing disk is what a check is for: an unreadable blob is reported and the others
    are still checked (it was a traceback at the first one); `--remove` leaves it, as it may
    be readable again. Run as root without the power to read anyone's files."""
    root = tmp_path / "cache"
    storage = FilesystemStorage(root)
    for data in (b"unreadable", b"good", b"also good"):
        path = storage.blob_path(digest_of(data))
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    locked = storage.blob_path(digest_of(b"unreadable"))
    os.chown(locked, 65534, 65534)
    locked.chmod(0o600)
    mirror = {"root": str(root), "upstream": [{"name": "x", "url": "http://x"}]}
    config = write_toml(tmp_path / "proxy.toml", {"mirror": mirror})
    command = [sys.executable, "-m", "edgeproxy.cli", "cache", "verify", "--config", str(config)]
    for extra in ([], ["--remove"]):
        done = subprocess.run([*WITHOUT_DAC, *command, *extra], capture_output=True, text=True)
        assert done.returncode == 1, done.stderr
        unreadable = f"unreadable: {digest_of(b'unreadable')} (10 B) cannot be read: Permission"
        assert unreadable in done.stdout
        assert "checked 3 blobs: 0 corrupt, 1 unreadable" in done.stdout
    assert locked.exists()


def test_cache_commands_run_as_root_leave_the_cache_to_its_owner(tmp_path: Path) -> None:
    """`sudo edgeproxy cache prune|warm` on the service's cache: run as root, files made as
    root (the eviction lock, blob folders) would leave the service (User=edgeproxy) unable to
    evict or cache. They are handed to the cache's owner."""
    root = tmp_path / "cache"
    (root / "docker/registry/v2").mkdir(parents=True)
    for path in (root, *root.rglob("*")):
        os.chown(path, 65534, 65534)
    with fake_upstream() as upstream:
        upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
        entry = {"name": "docker.io", "url": upstream.url}
        mirror = {"root": str(root), "upstream": [entry], "cache": {"max_size": "1GiB"}}
        config = str(write_toml(tmp_path / "proxy.toml", {"mirror": mirror}))
        for command in (["prune"], ["warm", "library/x:v1"]):
            done = subprocess.run(
                [sys.executable, "-m", "edgeproxy.cli", "cache", *command, "--config", config],
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr
        assert FilesystemStorage(root).blob_size(digest_of(b"layer")) == 5
        assert [p for p in root.rglob("*") if p.stat().st_uid != 65534] == []


def test_ls_and_du_run_as_root_leave_a_registry2_cache_to_its_owner(tmp_path: Path) -> None:
    """`sudo edgeproxy cache ls` on a root registry:2 wrote (no edgeproxy/ folder yet) made
    edgeproxy/fills/ as root, and handed nothing over: the service (User=edgeproxy) then
    could not lock a fill there, and every cold blob was a 503."""
    root = tmp_path / "cache"
    (root / "docker/registry/v2/blobs").mkdir(parents=True)
    for path in (root, *root.rglob("*")):
        os.chown(path, 65534, 65534)
    mirror = {"root": str(root), "upstream": [{"name": "x", "url": "http://x"}]}
    config = str(write_toml(tmp_path / "proxy.toml", {"mirror": mirror}))
    for action in ("ls", "du"):
        assert main(["cache", action, "--config", config]) == 0
        assert [p for p in root.rglob("*") if p.stat().st_uid != 65534] == []


def test_a_user_who_may_only_read_the_cache_reads_it(tmp_path: Path) -> None:
    """`edgeproxy cache ls` by an operator who can read the service's cache but not write it,
    while a fill runs (its files in edgeproxy/fills/): a PermissionError traceback, as were
    du and verify. Now they answer; prune says what it cannot write, exit 1."""
    root = tmp_path / "cache"
    storage = FilesystemStorage(root)
    put = storage.try_begin_blob(digest_of(b"layer"))
    assert put is not None
    put.write(b"layer")
    put.commit(len(b"layer"))
    (root / "edgeproxy/fills/sha256-0.partial").write_bytes(b"a fill's spool")
    for path in (root, *root.rglob("*")):
        os.chown(path, 65534, 65534)
    upstreams = [{"name": "x", "url": "http://x"}]
    mirror = {"root": str(root), "upstream": upstreams, "cache": {"max_size": "1GiB"}}
    config = str(write_toml(tmp_path / "proxy.toml", {"mirror": mirror}))
    command = [sys.executable, "-m", "edgeproxy.cli", "cache"]
    for action in ("ls", "du", "verify", "prune"):
        done = subprocess.run(
            [*WITHOUT_DAC, *command, action, "--config", config], capture_output=True, text=True
        )
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == (1 if action == "prune" else 0), done.stderr
        if action == "verify":
            assert "checked 1 blobs: 0 corrupt" in done.stdout
    assert f"edgeproxy: {root}/edgeproxy/evict.lock: Permission denied" in done.stderr


def test_handing_over_never_follows_a_folder_swapped_for_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache's owner swaps a folder the walk has listed for a link to /etc: what root owns
    there must not be handed over (that would make the service's user root)."""
    root = tmp_path / "cache"
    (root / "a").mkdir(parents=True)
    for path in (root, root / "a"):
        os.chown(path, 65534, 65534)
    (root / "a" / "made-by-root").write_text("")
    victim = tmp_path / "etc"
    victim.mkdir()
    (victim / "made-by-root").write_text("")
    real_fwalk = os.fwalk

    def fwalk_with_a_swap(top: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for step in real_fwalk(top, *args, **kwargs):
            if step[0] == str(root / "a"):
                os.rename(root / "a", root / "a.old")
                os.symlink(victim, root / "a")
            yield step

    monkeypatch.setattr(os, "fwalk", fwalk_with_a_swap)
    with cache_cli.owned_as_the_cache(root):
        pass
    assert (victim / "made-by-root").stat().st_uid == 0
    assert (root / "a.old" / "made-by-root").stat().st_uid == 65534


def test_warm_prints_an_image_name_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """rich reads `[/]` as markup: a name (or an upstream's error text) is printed verbatim."""
    mirror = {"root": str(tmp_path / "cache"), "upstream": [{"name": "x", "url": "http://x"}]}
    config = write_toml(tmp_path / "proxy.toml", {"mirror": mirror})
    assert main(["cache", "warm", "--config", str(config), "alpine[/]", "a:b:c"]) == 1
    err = capsys.readouterr().err
    assert "edgeproxy: alpine[/]: " in err and "edgeproxy: a:b:c: " in err


def test_the_cache_commands_need_a_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror = {"root": str(tmp_path / "none"), "upstream": [{"name": "x", "url": "http://x"}]}
    config = write_toml(tmp_path / "proxy.toml", {"mirror": mirror})
    for action in ("ls", "du", "prune", "verify"):
        assert main(["cache", action, "--config", str(config)]) == 1
        assert "no cache at" in capsys.readouterr().err


def test_check_reads_and_names_the_cache_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upstreams = [{"name": "x", "url": "http://x"}]
    good = {"max_size": "200GiB", "max_age": "168h", "interval": "30s"}
    mirror = {"listen": "127.0.0.1:5000", "upstream": upstreams, "cache": good}
    config = write_toml(tmp_path / "good.toml", {"mirror": mirror})
    assert main(["check", "--config", str(config)]) == 0
    bad = {"max_size": "lots", "interval": "0s", "ttl": "1h"}
    config = write_toml(tmp_path / "bad.toml", {"mirror": {"upstream": upstreams, "cache": bad}})
    assert main(["check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "mirror.cache.max_size: not a size" in err
    assert "mirror.cache.interval:" in err
    assert "mirror.cache.ttl: unknown key" in err


def test_warm_refuses_a_digest_that_is_a_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hostile upstream (or one on http:// behind a man in the middle) names a layer
    `sha256:../..`: the digest is refused before it becomes a path."""
    escape = "sha256:../../../../../../escaped"
    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/json", "digest": escape, "size": 1},
        "layers": [],
    }
    data = json.dumps(document).encode()
    with fake_upstream() as upstream:
        upstream.manifests[digest_of(data)] = data
        upstream.tags["v1"] = digest_of(data)
        entry = {"name": "docker.io", "url": upstream.url}
        mirror = {"root": str(tmp_path / "deep/down/cache"), "upstream": [entry]}
        config = ["--config", str(write_toml(tmp_path / "cli.toml", {"mirror": mirror}))]
        assert main(["cache", "warm", *config, "test/evil:v1"]) == 1
    assert "invalid digest" in capsys.readouterr().err
    assert not any(path.name.startswith("escaped") for path in tmp_path.rglob("*"))


def test_warm_refuses_an_index_entry_that_is_no_descriptor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest need only be a JSON object to be served; an index whose entries are not
    objects is a clear error of that image, not a traceback that stops the others."""
    index = json.dumps({"schemaVersion": 2, "manifests": [1, "x"]}).encode()
    with fake_upstream() as upstream:
        upstream.manifests[digest_of(index)] = index
        upstream.tags["v1"] = digest_of(index)
        upstream.add_manifest("v2", [upstream.add_blob(b"layer")])
        entry = {"name": "docker.io", "url": upstream.url}
        mirror = {"root": str(tmp_path / "cache"), "upstream": [entry]}
        config = ["--config", str(write_toml(tmp_path / "cli.toml", {"mirror": mirror}))]
        assert main(["cache", "warm", *config, "test/odd:v1", "test/fine:v2"]) == 1
    err = capsys.readouterr().err
    assert "edgeproxy: test/odd:v1: an index entry is not a descriptor" in err
    assert "test/fine:v2: 1 blob cached" in err  # the next image is warmed all the same


def test_prune_without_limits_sweeps_what_killed_processes_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No limits to apply, but leftovers to sweep (an atomic write's temporary over an hour
    old, here): `cache prune` removes them, as a pass does; `--dry-run` removes nothing."""
    root = tmp_path / "cache"
    FilesystemStorage(root)
    leftover = root / "edgeproxy/fills/.sha256-0.size.0123456789ab.tmp"
    leftover.write_bytes(b"5")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    mirror = {"root": str(root), "upstream": [{"name": "x", "url": "http://x"}]}
    config = str(write_toml(tmp_path / "proxy.toml", {"mirror": mirror}))
    assert main(["cache", "prune", "--dry-run", "--config", config]) == 0
    assert leftover.exists()
    assert main(["cache", "prune", "--config", config]) == 0
    assert not leftover.exists()
    assert "no limits set" in capsys.readouterr().out

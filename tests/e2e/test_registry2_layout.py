"""The cache's layout, read by the real registry:2 (Debian docker-registry 2.8): a cache
edgeproxy filled is served by registry:2 with the upstream gone, with the same digests,
catalog and tags, and `registry garbage-collect` keeps what edgeproxy serves."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy.cli import main
from edgeproxy.mirror.manifests import UPSTREAM_ACCEPT
from tests.support.images import build_image, build_index, push, random_layer
from tests.support.registry import Registry, garbage_collect, start_registry
from tests.support.servers import run_edgeproxy, write_toml

pytestmark = pytest.mark.e2e


def entry(registry: Registry, name: str) -> dict[str, Any]:
    return {"name": name, "url": registry.url}


def get(url: str, **params: str) -> httpx.Response:
    response = httpx.get(url, headers={"Accept": UPSTREAM_ACCEPT}, params=params, timeout=30)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text}"
    return response


def tags_of(base: str, repo: str) -> list[str]:
    return sorted(get(f"{base}/v2/{repo}/tags/list").json()["tags"])


def pull(base: str, repo: str, reference: str, **params: str) -> dict[str, str]:
    """A manifest and all it references (an index's children, their config and layers), as
    a client pulls them: `{"<path>": digest of the bytes received}`."""
    manifest = get(f"{base}/v2/{repo}/manifests/{reference}", **params)
    got = {f"{repo}:{reference}": "sha256:" + hashlib.sha256(manifest.content).hexdigest()}
    document = manifest.json()
    for child in document.get("manifests", []):
        got |= pull(base, repo, child["digest"], **params)
    for blob in [document["config"], *document["layers"]] if "layers" in document else []:
        body = get(f"{base}/v2/{repo}/blobs/{blob['digest']}", **params).content
        got[f"{repo}@{blob['digest']}"] = "sha256:" + hashlib.sha256(body).hexdigest()
    return got


def test_registry2_serves_a_cache_edgeproxy_filled(tmp_path: Path) -> None:
    """Several repositories and tags, a multi-arch index, a Docker Hub one-name image, a
    second upstream picked by `?ns=` and by its name's prefix: registry:2 (plain and as a
    mirror whose upstream stopped) pulls each with the digests edgeproxy served, and lists
    the repositories and tags edgeproxy lists."""
    hub, other = start_registry(tmp_path / "hub"), start_registry(tmp_path / "other")
    try:
        small = build_image(tmp_path / "small", "v1", [random_layer(2048, seed=601)])
        newer = build_image(tmp_path / "newer", "v2", [random_layer(2048, seed=602)])
        multi = build_index(tmp_path / "multi", "v1", [("linux", "amd64"), ("linux", "arm64")])
        for image, repo, tag in [
            (small, "library/alpine", "3.20"),
            (small, "library/alpine", "latest"),
            (newer, "library/alpine", "3.21"),
            (multi, "team/app", "v1"),
            (newer, "team/app/sidecar", "v1"),
        ]:
            push(image, hub, repo, tag)
        push(small, other, "owner/repo", "v1")
        push(multi, other, "owner/multi", "v1")
        # (name asked, tag, query) -> the name registry:2 finds it under
        asked = {
            ("alpine", "3.20", ()): "library/alpine",
            ("library/alpine", "latest", ()): "library/alpine",
            ("alpine", "3.21", ()): "library/alpine",
            ("team/app", "v1", ()): "team/app",
            ("team/app/sidecar", "v1", ()): "team/app/sidecar",
            ("owner/repo", "v1", (("ns", "quay.io"),)): "quay.io/owner/repo",
            ("quay.io/owner/multi", "v1", ()): "quay.io/owner/multi",
        }
        served: dict[str, str] = {}
        workdir = tmp_path / "edgeproxy"
        with run_edgeproxy(workdir, [entry(hub, "docker.io"), entry(other, "quay.io")]) as mirror:
            for (name, tag, query), stored in asked.items():
                got = pull(mirror.url, name, tag, **dict(query))
                served |= {key.replace(name, stored, 1): d for key, d in got.items()}
            catalog = get(f"{mirror.url}/v2/_catalog").json()
            tags = {r: tags_of(mirror.url, r) for r in set(asked.values())}
        hub.stop()
        other.stop()
        assert catalog == {"repositories": sorted(set(asked.values()))}
        plain = start_registry(tmp_path / "plain", storage=workdir / "cache")
        try:
            for (_, tag, _), stored in asked.items():
                assert pull(plain.url, stored, tag).items() <= served.items()
            assert get(f"{plain.url}/v2/_catalog").json() == catalog
            for repo, listed in tags.items():
                assert tags_of(plain.url, repo) == listed
        finally:
            plain.close()
        # A registry:2 mirror panics at start without its upstream: it goes away after.
        hub.start()
        proxy = start_registry(tmp_path / "proxy", remote=hub.url, storage=workdir / "cache")
        hub.stop()
        try:
            for (_, tag, _), stored in asked.items():
                assert pull(proxy.url, stored, tag).items() <= served.items()
        finally:
            proxy.close()
    finally:
        hub.close()
        other.close()


def test_a_manifest_pulled_alone_survives_registry2s_gc(tmp_path: Path) -> None:
    """A client that only reads a manifest (`skopeo inspect`, a digest check) leaves a
    repository without layers. registry:2 knows a repository by its _layers folder: its GC
    skipped that repository and deleted the manifest, which edgeproxy then could not serve
    with the upstream down (503); and registry:2's catalog did not list it."""
    upstream = start_registry(tmp_path / "upstream")
    try:
        image = build_image(tmp_path / "image", "v1", [random_layer(2048, seed=610)])
        push(image, upstream, "test/inspected", "v1")
        workdir = tmp_path / "edgeproxy"
        manifest = image.blob_path(image.manifest_digest).read_bytes()
        path = "/v2/test/inspected/manifests/v1"
        with run_edgeproxy(workdir, [entry(upstream, "docker.io")]) as mirror:
            assert get(mirror.url + path).content == manifest
        upstream.stop()
        garbage_collect(workdir / "cache")
        with run_edgeproxy(workdir, [entry(upstream, "docker.io")]) as mirror:
            assert get(mirror.url + path).content == manifest  # stale, from the cache
        registry2 = start_registry(tmp_path / "registry2", storage=workdir / "cache")
        try:
            catalog = get(f"{registry2.url}/v2/_catalog").json()
            assert catalog == {"repositories": ["test/inspected"]}
        finally:
            registry2.close()
    finally:
        upstream.close()


def test_an_upstream_named_with_a_port_leaves_a_cache_registry2_reads(tmp_path: Path) -> None:
    """An upstream named `host:port` was cached under a `host:port/` folder; registry:2's
    storage refuses a ":" in a path, so its catalog and garbage-collect failed on the whole
    cache. Such an upstream is cached under `host_port/` (the name the catalog lists, and a
    client may pull by); registry:2 lists it, collects garbage and serves it."""
    hub, private = start_registry(tmp_path / "hub"), start_registry(tmp_path / "private")
    try:
        image = build_image(tmp_path / "image", "v1", [random_layer(2048, seed=620)])
        push(image, private, "team/tool", "v1")
        cached = f"{private.host.replace(':', '_')}/team/tool"
        workdir = tmp_path / "edgeproxy"
        upstreams = [entry(hub, "docker.io"), entry(private, private.host)]
        with run_edgeproxy(workdir, upstreams) as mirror:
            served = pull(mirror.url, "team/tool", "v1", ns=private.host)
            assert get(f"{mirror.url}/v2/_catalog").json() == {"repositories": [cached]}
            assert pull(mirror.url, cached, "v1") == {
                key.replace("team/tool", cached): digest for key, digest in served.items()
            }
        private.stop()
        garbage_collect(workdir / "cache")
        registry2 = start_registry(tmp_path / "registry2", storage=workdir / "cache")
        try:
            assert get(f"{registry2.url}/v2/_catalog").json() == {"repositories": [cached]}
            assert pull(registry2.url, cached, "v1")[f"{cached}:v1"] == image.manifest_digest
        finally:
            registry2.close()
        with run_edgeproxy(workdir, upstreams) as mirror:
            assert pull(mirror.url, "team/tool", "v1", ns=private.host) == served
    finally:
        hub.close()
        private.close()


def test_uploads_registry2_left_go_after_a_week(tmp_path: Path) -> None:
    """A registry:2 mirror leaves `_uploads/<id>` behind when a download to its cache fails
    (it never cancels them) and purges them after a week; edgeproxy never did, nor counted
    them: a cache taken over kept partial layers for good. The eviction pass removes those a
    week old, as registry:2's purge does; newer ones (a registry:2 still running) stay."""
    registry2 = start_registry(tmp_path / "registry2")
    try:
        for name in ("old/upload", "new/upload"):
            started = httpx.post(f"{registry2.url}/v2/{name}/blobs/uploads/")
            assert started.status_code == 202, started.text
            sent = httpx.patch(started.headers["location"], content=b"x" * 1000)
            assert sent.status_code == 202, sent.text
    finally:
        registry2.close()
    repositories = registry2.root / "docker/registry/v2/repositories"
    eight_days_ago = time.time() - 8 * 86400
    for folder, _, files in os.walk(repositories / "old"):
        for name in [*files, "."]:
            os.utime(Path(folder) / name, (eight_days_ago, eight_days_ago))
    upstreams = [{"name": "docker.io", "url": "http://127.0.0.1:1"}]
    config = {"root": str(registry2.root), "cache": {"max_age": "30d"}, "upstream": upstreams}
    path = write_toml(tmp_path / "proxy.toml", {"mirror": config})
    assert main(["cache", "prune", "--config", str(path)]) == 0
    assert not (repositories / "old").exists()
    assert len(list((repositories / "new/upload/_uploads").iterdir())) == 1

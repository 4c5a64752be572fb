"""Upstream faults never leave a partial or wrong blob in the cache or serve one as complete."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from edgeproxy.mirror.app import MirrorApp
from edgeproxy.mirror.blobs import (
    CHUNK,
    FILL_THREADS,
    WINDOW,
    WINDOWS,
    BlobService,
    Fill,
    Windows,
    _settle,
)
from edgeproxy.mirror.cache_status import STALE
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.manifests import OCI_MANIFEST, Manifest
from edgeproxy.mirror.names import resolve_target
from edgeproxy.mirror.storage.filesystem import FilePartialBlob, FilesystemStorage
from tests.mirror.fake_upstream import FakeUpstream, fake_upstream, mirror_of
from tests.support.disk import fill_up, small_tmpfs
from tests.support.ports import free_port
from tests.support.servers import serve_app
from tests.support.verify import verify_cache
from tests.support.wait import wait_until

BLOB = os.urandom(5 * 1024 * 1024 + 3)
BIG = os.urandom(48 * 1024 * 1024)  # bigger than the memory window many times over


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with fake_upstream() as fake:
        yield fake


@pytest.fixture
def mirror(tmp_path: Path, upstream: FakeUpstream) -> Iterator[tuple[MirrorApp, httpx.Client]]:
    # Short enough for the stall fault to end the fill soon, long enough that a busy machine
    # never stalls a healthy upstream past it (1 s did, once).
    app = mirror_of(upstream, tmp_path / "cache", read_timeout="4s")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield app, client


def disk_full(*args: object) -> NoReturn:
    """A storage write that finds the disk full."""
    raise OSError(errno.ENOSPC, "No space left on device")


def pull_unlinked(
    app: MirrorApp, client: httpx.Client, monkeypatch: pytest.MonkeyPatch, digest: str, data: bytes
) -> None:
    """Pull a cold blob in repository x while the full disk refuses its layer link (the fill
    and its commit included): served, not linked."""
    with monkeypatch.context() as patch:
        patch.setattr(app.storage, "link_blob", disk_full)
        assert fetch(client, f"/v2/x/blobs/{digest}") == (200, data, True)
        assert wait_until(lambda: digest not in app.blobs._fills)  # committed, linked
    assert not app.storage.blob_linked("x", digest)


def cache_files(app: MirrorApp) -> list[str]:
    root = app.config.root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def fetch(client: httpx.Client, path: str) -> tuple[int, bytes, bool]:
    """(status, body, complete): complete is False when the connection was cut short."""
    body = bytearray()
    try:
        with client.stream("GET", path) as response:
            for chunk in response.iter_raw():
                body += chunk
            return response.status_code, bytes(body), True
    except httpx.RemoteProtocolError:
        return 200, bytes(body), False


@pytest.mark.parametrize("fault", ["cut", "wrong", "stall"])
def test_faulty_blob_is_never_cached_or_served_whole(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream, fault: str
) -> None:
    app, client = mirror
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = fault
    status, body, complete = fetch(client, f"/v2/x/blobs/{digest}")
    assert status == 200
    assert not complete and len(body) < len(BLOB)
    assert app.storage.blob_size(digest) is None
    assert cache_files(app) == []  # no partial survives
    # The next request, with the upstream healthy again, fills the blob.
    del upstream.faults[digest]
    assert fetch(client, f"/v2/x/blobs/{digest}") == (200, BLOB, True)
    # Clients get the last byte once the digest matched; the commit (fsync, rename) follows.
    assert wait_until(lambda: app.storage.blob_size(digest) == len(BLOB))


@pytest.mark.parametrize(
    "ranges", ["bytes=0-99", f"bytes=100-{len(BLOB) - 2}", "bytes=0-9,20-29", "bytes=-5"]
)
def test_a_range_of_a_wrong_cold_blob_is_never_served_whole(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream, ranges: str
) -> None:
    """A range of a blob being filled waits for the digest check too: its last byte goes only
    once the whole blob matched. A client of a 206 cannot check the digest itself; a complete
    answer of wrong bytes is a blob served under a digest it does not hash to."""
    app, client = mirror
    digest = upstream.add_blob(BLOB)
    upstream.faults[digest] = "wrong"
    body = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("GET", f"/v2/x/blobs/{digest}", headers={"Range": ranges}) as response,
    ):
        assert response.status_code == 206
        for chunk in response.iter_raw():
            body += chunk
    assert len(body) < int(response.headers["content-length"])
    assert app.storage.blob_size(digest) is None
    # Healthy, the same range comes whole (cold: the last byte once the digest matched).
    del upstream.faults[digest]
    whole = client.get(f"/v2/x/blobs/{digest}", headers={"Range": ranges})
    assert whole.status_code == 206
    assert whole.headers["cache-status"].startswith("edgeproxy; fwd=miss")
    if "," not in ranges:
        start, _, end = whole.headers["content-range"].removeprefix("bytes ").partition("-")
        assert whole.content == BLOB[int(start) : int(end.partition("/")[0]) + 1]


def test_manifest_with_wrong_digest_is_refused(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    app, client = mirror
    layer = upstream.add_blob(b"layer")
    digest = upstream.add_manifest("v1", [layer])
    upstream.manifests[digest] += b" "
    response = client.get(f"/v2/x/manifests/{digest}")
    assert response.status_code == 503
    assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert app.storage.read_manifest("x", digest) is None


@pytest.mark.parametrize("torn", [b"", b"{"], ids=["empty", "cut"])
def test_a_stored_manifest_torn_by_a_crash_is_fetched_again(
    torn: bytes, tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Small files are renamed into place without an fsync (as registry:2 writes them): after
    a power cut one may hold nothing, or a part. Its bytes no longer match its digest: fetched
    again, never served under that digest; with the upstream failing, a 503."""
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    path = f"/v2/x/manifests/{digest}"
    first = mirror_of(upstream, tmp_path / "cache")
    with serve_app(first) as url:
        assert httpx.get(url + path).status_code == 200
    data = first.config.root / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
    data.write_bytes(torn)
    upstream.faults[f"/manifests/{digest}"] = 500
    restarted = mirror_of(upstream, tmp_path / "cache")
    with serve_app(restarted) as url:
        down = httpx.get(url + path)
        assert down.status_code == 503, down.text
        del upstream.faults[f"/manifests/{digest}"]
        again = httpx.get(url + path)
        assert (again.status_code, again.content) == (200, upstream.manifests[digest])
        assert again.headers["cache-status"] == "edgeproxy; fwd=miss"
    assert restarted.storage.read_manifest("x", digest) == upstream.manifests[digest]


@pytest.mark.parametrize("torn", [b"", b"sha256:0123"], ids=["empty", "cut"])
def test_a_tag_link_torn_by_a_crash_is_fetched_again(
    torn: bytes, tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A tag's link torn by a power cut names no manifest: the tag is asked upstream again;
    with the upstream failing, a clear error, never a 500."""
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    first = mirror_of(upstream, tmp_path / "cache")
    with serve_app(first) as url:
        assert httpx.get(url + "/v2/x/manifests/v1").status_code == 200
    link = first.config.root / "docker/registry/v2/repositories/x/_manifests/tags/v1/current/link"
    link.write_bytes(torn)
    upstream.faults["/manifests/v1"] = 500
    restarted = mirror_of(upstream, tmp_path / "cache")
    with serve_app(restarted) as url:
        down = httpx.get(url + "/v2/x/manifests/v1")
        assert down.status_code == 503, down.text
        assert down.json()["errors"][0]["code"] == "UNAVAILABLE"
        del upstream.faults["/manifests/v1"]
        again = httpx.get(url + "/v2/x/manifests/v1")
        assert (again.status_code, again.content) == (200, upstream.manifests[digest])
    tag = restarted.storage.read_tag("x", "v1")
    assert tag is not None and tag[0] == digest


def test_a_compressing_proxy_in_front_of_the_upstream_changes_no_byte(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    """httpx offered gzip by default and passed the raw body on: tags came as gzip bytes
    labelled JSON, manifests failed their digest. The mirror asks for identity everywhere."""
    _, client = mirror
    layer = upstream.add_blob(b"layer " * 100)
    digest = upstream.add_manifest("v1", [layer])
    for suffix in ("/tags/list", "/manifests/v1", f"/manifests/{digest}", layer):
        upstream.faults[suffix] = "gzip"
    tags = client.get("/v2/x/tags/list")
    assert (tags.status_code, tags.json()) == (200, {"name": "x", "tags": ["v1"]})
    manifest = client.get("/v2/x/manifests/v1")
    assert (manifest.status_code, manifest.content) == (200, upstream.manifests[digest])
    assert fetch(client, f"/v2/x/blobs/{layer}") == (200, b"layer " * 100, True)
    encodings = {headers.get("accept-encoding") for headers in upstream.headers.values()}
    assert encodings == {"identity"}


def test_cached_tag_is_served_stale_when_the_upstream_fails(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    _, client = mirror
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    first = client.get("/v2/x/manifests/v1")
    assert (first.status_code, first.headers["cache-status"]) == (200, "edgeproxy; fwd=miss")
    again = client.get("/v2/x/manifests/v1")
    assert again.headers["cache-status"] == "edgeproxy; fwd=stale; fwd-status=200"
    # Down, overloaded, refusing, or the tag deleted upstream: registry:2 serves its copy.
    for fault in (500, 429, 401, 403, 404):
        upstream.faults["/manifests/v1"] = fault
        stale = client.get("/v2/x/manifests/v1")
        assert stale.status_code == 200, fault
        assert stale.headers["cache-status"] == "edgeproxy; hit; detail=stale"
        assert stale.headers["docker-content-digest"] == digest
    del upstream.faults["/manifests/v1"]
    del upstream.tags["v1"]
    assert client.get("/v2/x/manifests/v1").headers["cache-status"] == STALE
    by_digest = client.get(f"/v2/x/manifests/{digest}")
    assert by_digest.headers["cache-status"] == "edgeproxy; hit"
    for fault in (500, 404):
        upstream.faults["/tags/list"] = fault
        tags = client.get("/v2/x/tags/list")
        assert (tags.json(), tags.headers["cache-status"]) == ({"name": "x", "tags": ["v1"]}, STALE)


def test_a_tag_never_names_a_manifest_the_disk_refused(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tag moved upstream; the disk refuses its new manifest (full), not the small tag link
    after it. The tag must go on naming the manifest the cache holds: it named the one the
    disk refused, and another worker, the upstream down, answered 503 for a cached tag."""
    old = upstream.add_manifest("v1", [upstream.add_blob(b"old layer")])
    app = mirror_of(upstream, tmp_path / "cache")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v2/x/manifests/v1").headers["docker-content-digest"] == old
        new = upstream.add_manifest("v1", [upstream.add_blob(b"new layer")])
        with monkeypatch.context() as patch:
            patch.setattr(app.storage, "write_manifest", disk_full)
            moved = client.get("/v2/x/manifests/v1")  # served, not cached
        assert (moved.status_code, moved.headers["docker-content-digest"]) == (200, new)
    tag = app.storage.read_tag("x", "v1")
    assert tag is not None and tag[0] == old
    upstream.faults["/manifests/v1"] = 503
    other = mirror_of(upstream, tmp_path / "cache")  # another worker
    with serve_app(other) as url, httpx.Client(base_url=url, timeout=30) as client:
        stale = client.get("/v2/x/manifests/v1")
        assert (stale.status_code, stale.headers["docker-content-digest"]) == (200, old)
        assert stale.headers["cache-status"] == STALE


def test_a_layer_link_the_disk_refused_is_written_at_the_next_pull(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold blob is committed, but the full disk refuses its repository's layer link. The
    upstream gave the blob in that repository: a pull there, the upstream down, must be
    served from the cache (it asked the upstream to confirm it first, and answered 503)."""
    digest = upstream.add_blob(b"layer")
    app = mirror_of(upstream, tmp_path / "cache")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        pull_unlinked(app, client, monkeypatch, digest, b"layer")
        assert app.storage.blob_size(digest) == len(b"layer")
        upstream.faults[f"/blobs/{digest}"] = 503
        again = client.get(f"/v2/x/blobs/{digest}")
        assert (again.status_code, again.content) == (200, b"layer")
        assert again.headers["cache-status"] == "edgeproxy; hit"
    assert app.storage.blob_linked("x", digest)
    assert upstream.requests[f"HEAD /v2/x/blobs/{digest}"] == 0


def test_a_layer_link_the_disk_refused_is_written_at_the_next_commit(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk has room again (it took the next blob): the link it refused is written then,
    so that the other workers, which never knew of it, serve the blob in that repository."""
    first, second = upstream.add_blob(b"first layer"), upstream.add_blob(b"second layer")
    app = mirror_of(upstream, tmp_path / "cache")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        pull_unlinked(app, client, monkeypatch, first, b"first layer")
        assert fetch(client, f"/v2/y/blobs/{second}") == (200, b"second layer", True)
        assert wait_until(lambda: app.storage.blob_linked("x", first))
    upstream.faults[f"/blobs/{first}"] = 503
    other = mirror_of(upstream, tmp_path / "cache")  # another worker
    with serve_app(other) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert fetch(client, f"/v2/x/blobs/{first}") == (200, b"first layer", True)


def test_a_layer_link_the_disk_refused_is_written_when_the_worker_stops(
    tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk has room again, but no blob came since: a restart must not lose the link that
    only this worker knew of (the next worker asked the upstream to confirm the blob: with
    the upstream down, a 503)."""
    digest = upstream.add_blob(b"layer")
    app = mirror_of(upstream, tmp_path / "cache")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        pull_unlinked(app, client, monkeypatch, digest, b"layer")
    upstream.faults[f"/blobs/{digest}"] = 503
    restarted = mirror_of(upstream, tmp_path / "cache")
    with serve_app(restarted) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert fetch(client, f"/v2/x/blobs/{digest}") == (200, b"layer", True)


def test_a_head_naming_no_digest_is_an_upstream_fault(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    """Its Docker-Content-Digest becomes a path: anything but a digest is the upstream's
    fault (503, the cached tag served stale), never a 500 from the storage."""
    _, client = mirror
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    assert client.get("/v2/x/manifests/v1").status_code == 200
    upstream.manifests["garbage"] = upstream.manifests[digest]
    upstream.tags["v1"] = upstream.tags["v2"] = "garbage"
    stale = client.get("/v2/x/manifests/v1")
    assert (stale.status_code, stale.headers["cache-status"]) == (200, STALE)
    cold = client.get("/v2/x/manifests/v2")
    assert (cold.status_code, cold.json()["errors"][0]["code"]) == (503, "UNAVAILABLE")


def test_a_manifest_refused_for_its_accept_says_what_the_cache_did(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    layer = upstream.add_blob(b"layer")
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": layer, "size": 5}
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": []}
    upstream.add_document("v1", document)
    _, client = mirror
    statuses = []
    for _ in range(2):
        refused = client.get("/v2/x/manifests/v1", headers={"Accept": "*/*"})
        assert refused.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        statuses.append(refused.headers["cache-status"])
    assert statuses == ["edgeproxy; fwd=miss", "edgeproxy; fwd=stale; fwd-status=200"]


def test_rate_limit_and_errors_pass_through_when_nothing_is_cached(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    """Each error says, in Cache-Status, that the cache missed and what the upstream said."""
    _, client = mirror
    upstream.faults["/manifests/v1"] = 429
    limited = client.get("/v2/x/manifests/v1")
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    assert limited.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert limited.headers["cache-status"] == "edgeproxy; fwd=miss; fwd-status=429"
    upstream.faults["/manifests/v1"] = 500
    failed = client.get("/v2/x/manifests/v1")
    assert failed.status_code == 503
    assert failed.headers["cache-status"] == "edgeproxy; fwd=miss; fwd-status=500"
    unknown = client.get("/v2/x/manifests/nope")
    assert unknown.status_code == 404
    assert unknown.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert unknown.headers["cache-status"] == "edgeproxy; fwd=miss; fwd-status=404"
    for method in ("HEAD", "GET"):
        missing = client.request(method, "/v2/x/blobs/sha256:" + "0" * 64)
        assert missing.status_code == 404
        assert missing.headers["cache-status"] == "edgeproxy; fwd=miss; fwd-status=404"
    assert missing.json()["errors"][0]["code"] == "BLOB_UNKNOWN"  # the GET's body


def test_upstream_headers_passed_on_only_when_printable_ascii(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    """A Retry-After or Link in UTF-8 (httpx decodes it so) could not be encoded in the
    client's head: a 500, uvicorn's own for a 429. Such a value is dropped."""
    _, client = mirror
    blob = upstream.add_blob(b"layer")
    upstream.add_manifest("v1", [blob])
    next_page = '</v2/x/tags/list?last=v1&n=1>; rel="next"'
    upstream.answer_headers["/tags/list"] = {"Link": next_page}
    assert client.get("/v2/x/tags/list").headers["link"] == next_page
    upstream.answer_headers["/tags/list"] = {"Link": next_page.replace("v1", "\u2603")}
    tags = client.get("/v2/x/tags/list")
    assert (tags.status_code, tags.json()["tags"], tags.headers.get("link")) == (200, ["v1"], None)
    upstream.answer_headers.clear()
    for path in ("/v2/x/manifests/v2", "/v2/x/tags/list", f"/v2/x/blobs/{blob}"):
        upstream.faults[path] = 429
        upstream.answer_headers[path] = {"Retry-After": "in 7 s \u2603"}
        limited = client.get(path)
        assert (limited.status_code, limited.headers.get("retry-after")) == (429, None), path
        assert limited.json()["errors"][0]["code"] == "TOOMANYREQUESTS"


def test_upstream_down_at_start(tmp_path: Path) -> None:
    with fake_upstream() as gone:
        pass  # stopped: nothing listens on its port any more
    with serve_app(mirror_of(gone, tmp_path)) as url, httpx.Client(base_url=url) as client:
        assert client.get("/v2/").status_code == 200
        response = client.get("/v2/x/manifests/v1")
        assert response.status_code == 503
        # Why, as registry:2 says it: the connect error's own words, not its type alone.
        message = response.json()["errors"][0]["message"]
        assert "unavailable" in message and "ConnectError: " in message, message
        blob = client.get(f"/v2/x/blobs/sha256:{'0' * 64}").json()["errors"][0]["message"]
        assert "ConnectError: " in blob or "refused" in blob.lower(), blob
        assert response.headers["cache-status"] == "edgeproxy; fwd=miss"  # no answer came


def test_a_trickling_upstream_is_cut_and_the_cache_answers(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """An upstream sending a byte now and then never hits the read timeout: a cached tag
    waited for it for ever. Each small request has a deadline (here 1 + 2 x 1 s)."""
    upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    app = mirror_of(upstream, tmp_path, connect_timeout="1s", read_timeout="1s")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/v2/x/manifests/v1").status_code == 200
        upstream.faults["/manifests/v1"] = upstream.faults["/tags/list"] = "trickle"
        stale = client.get("/v2/x/manifests/v1")
        assert (stale.status_code, stale.headers["cache-status"]) == (200, STALE)
        tags = client.get("/v2/x/tags/list")
        assert (tags.json()["tags"], tags.headers["cache-status"]) == (["v1"], STALE)


def test_a_big_manifest_coming_steadily_is_not_cut(tmp_path: Path) -> None:
    """The deadline of a small request grows with its body: a 3 MiB manifest coming at 1.3 MB/s
    took longer than a connect and two reads (1.5 s here) and was refused, 503."""
    with fake_upstream() as upstream:
        layer = upstream.add_blob(b"layer")
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": layer},
            "layers": [],
            "annotations": {"pad": "x" * (3 * 1024 * 1024)},
        }
        digest = upstream.add_document("v1", document)
        upstream.faults["/manifests/v1"] = upstream.faults[digest] = "steady"
        app = mirror_of(upstream, tmp_path, connect_timeout="0.5s", read_timeout="0.5s")
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=120) as client:
            response = client.get("/v2/x/manifests/v1", headers={"Accept": OCI_MANIFEST})
            assert response.status_code == 200, response.text
            assert response.headers["docker-content-digest"] == digest


def test_client_disconnect_does_not_abort_the_fill(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    app, client = mirror
    digest = upstream.add_blob(BLOB)
    with client.stream("GET", f"/v2/x/blobs/{digest}") as response:
        next(response.iter_raw())  # one piece, then hang up
    assert wait_until(lambda: app.storage.blob_size(digest) == len(BLOB))
    assert upstream.requests[f"GET /v2/x/blobs/{digest}"] == 1


def test_a_fill_nobody_reads_keeps_no_memory_window() -> None:
    """The window is for this process's readers: one whose clients left (or that has none)
    keeps only what is not on disk yet. A client that asks for many cold blobs and hangs up
    at once left 8 MiB a fill (~10 MiB with its threads' blocks: 100 fills, 1 GB) for as
    long as each download took."""
    fill = Fill("sha256:" + "0" * 64, "x")
    reader = object()
    fill.reader_at(reader, 0)
    for _ in range(4):
        fill.receive(bytearray(CHUNK))
        fill.advance(fill.received)
    assert fill.in_memory(0, CHUNK) is not None  # kept for its reader
    fill.reader_at(reader, None)  # gone
    assert fill.in_memory(0, CHUNK) is None
    fill.receive(bytearray(CHUNK))
    assert fill.in_memory(4 * CHUNK, 5 * CHUNK) is not None  # not on disk yet
    fill.advance(fill.received)
    assert fill.in_memory(4 * CHUNK, 5 * CHUNK) is None


def test_the_memory_windows_of_all_fills_stay_within_one_budget() -> None:
    """Many cold blobs at once, each with a client that reads nothing (or slowly): together
    their windows keep WINDOWS bytes at most; past that, readers take the bytes from the
    spool (the page cache), as they do once they fall behind a window."""
    windows = Windows()
    fills = [Fill(f"sha256:{n:064x}", "x", windows) for n in range(2 * WINDOWS // WINDOW)]
    for fill in fills:
        fill.reader_at(object(), 0)
        for _ in range(WINDOW // CHUNK + 2):
            fill.receive(bytearray(CHUNK))
            fill.advance(fill.received)
    held = sum(len(block) for fill in fills for _, block in fill._window)
    assert held == windows.bytes <= WINDOWS
    for fill in fills[: len(fills) // 2]:
        fill.commit()  # their windows go: the others may keep theirs again
    assert windows.bytes == sum(len(block) for fill in fills for _, block in fill._window)


def test_many_fills_at_once_share_the_threads_that_hash_and_write(tmp_path: Path) -> None:
    """Each fill hashed and wrote its blocks in two threads of its own, started and joined
    on the event loop, which waited for each: with hundreds of cold blobs at once, a quarter of
    its time went there (bench/README.md). The fills share FILL_THREADS now, and each one's
    blocks are still hashed and written in order."""
    storage = FilesystemStorage(tmp_path)
    service = BlobService(storage)
    go_on = asyncio.Event()

    async def body(blocks: list[bytearray]) -> AsyncIterator[bytearray]:
        yield blocks[0]
        await go_on.wait()  # every fill is under way at once
        for block in blocks[1:]:
            yield block

    async def many_at_once() -> tuple[int, list[str]]:
        before = threading.active_count()
        fills, tasks, digests = [], [], []
        for index in range(24):
            blocks = [bytearray(index.to_bytes(8, "big") + os.urandom(CHUNK - 8)) for _ in "ab"]
            blocks.append(bytearray(b"the end"))
            digest = "sha256:" + hashlib.sha256(b"".join(blocks)).hexdigest()
            partial = storage.try_begin_blob(digest)
            assert partial is not None
            fill = Fill(digest, "x")
            fills.append(fill)
            digests.append(digest)
            tasks.append(asyncio.create_task(service._stream(fill, body(blocks), partial)))
        while not all(fill.written == CHUNK for fill in fills):
            await asyncio.sleep(0.01)
        threads = threading.active_count() - before
        go_on.set()
        await asyncio.gather(*tasks)
        await service.aclose()
        return threads, digests

    threads, digests = asyncio.run(many_at_once())
    assert threads <= FILL_THREADS
    assert [storage.blob_size(digest) for digest in digests] == [2 * CHUNK + 7] * 24


def test_head_of_a_cold_blob_never_downloads_it(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    app, client = mirror
    digest = upstream.add_blob(BLOB)
    head = client.head(f"/v2/x/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(BLOB))
    assert upstream.requests[f"GET /v2/x/blobs/{digest}"] == 0
    assert app.storage.blob_size(digest) is None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs as the cache root: it fills up in the middle of a bigger blob."""
    with small_tmpfs(tmp_path / "small") as root:
        yield root


def test_disk_full_streams_the_blob_without_caching_it(
    small_disk: Path, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    big = os.urandom(48 * 1024 * 1024)
    digest = upstream.add_blob(big)
    small = upstream.add_blob(b"small layer")
    app = mirror_of(upstream, small_disk)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert fetch(client, f"/v2/x/blobs/{digest}") == (200, big, True)
        assert app.storage.blob_size(digest) is None
        assert wait_until(lambda: verify_cache(small_disk).leftovers == [])
        # The space is free again: the server goes on serving, and caching.
        assert fetch(client, f"/v2/x/blobs/{small}") == (200, b"small layer", True)
        assert wait_until(lambda: app.storage.blob_size(small) == len(b"small layer"))
        assert fetch(client, f"/v2/x/blobs/{digest}") == (200, big, True)
        # The failed spool is removed (at once, but in a thread): fill the disk only then,
        # or its removal frees space again.
        assert wait_until(lambda: verify_cache(small_disk).leftovers == [])
        # Full before the first byte: blobs, manifests and tags are still served.
        fill_up(small_disk / "filler")
        assert fetch(client, f"/v2/x/blobs/{digest}") == (200, big, True)
        manifest = upstream.add_manifest("v1", [small])
        response = client.get("/v2/x/manifests/v1")
        assert (response.status_code, response.headers["docker-content-digest"]) == (200, manifest)
        (small_disk / "filler").unlink()
        assert wait_until(lambda: verify_cache(small_disk).leftovers == [])
    assert any("without caching" in r.getMessage() for r in caplog.records)
    report = verify_cache(small_disk)
    assert (report.blobs, report.corrupt, report.leftovers) == (1, [], [])


def test_a_read_only_cache_still_serves_everything(
    tmp_path: Path, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache's file system turned read-only (ext4's errors=remount-ro): what is cached is
    served, and what is not is fetched and streamed, verified, not cached; as registry:2
    serves what it cannot store. A new blob was a 503 "the cache cannot be written"."""
    with small_tmpfs(tmp_path / "cache", "64m") as root:
        old = upstream.add_blob(b"old layer")
        upstream.add_manifest("v1", [old])
        app = mirror_of(upstream, root)
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v2/x/manifests/v1").status_code == 200
            assert fetch(client, f"/v2/x/blobs/{old}") == (200, b"old layer", True)
            assert wait_until(lambda: old not in app.blobs._fills)  # committed: nothing open
            remount = ["mount", "-o", "remount,ro", str(root)]
            assert wait_until(lambda: subprocess.run(remount).returncode == 0)  # "busy" a while
            new = upstream.add_blob(BLOB)
            v2 = upstream.add_manifest("v2", [new])
            assert fetch(client, f"/v2/x/blobs/{new}") == (200, BLOB, True)
            assert fetch(client, f"/v2/x/blobs/{new}") == (200, BLOB, True)  # again: a fill
            assert client.get("/v2/x/manifests/v2").headers["docker-content-digest"] == v2
            assert client.get("/v2/x/manifests/v1").status_code == 200
            assert fetch(client, f"/v2/x/blobs/{old}") == (200, b"old layer", True)
            assert client.get("/v2/x/tags/list").json()["tags"] == ["v1", "v2"]
        assert app.storage.blob_size(new) is None
        assert upstream.requests[f"GET /v2/x/blobs/{new}"] == 2
        assert "Read-only file system" in caplog.text


def test_a_manifest_a_full_disk_refused_leaves_no_folder(
    small_disk: Path, upstream: FakeUpstream
) -> None:
    """A manifest served while the disk is full is not cached, and leaves nothing: its blob
    folder stayed behind empty, one for each manifest refused, that no eviction pass saw."""
    manifest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    app = mirror_of(upstream, small_disk)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        before = sorted(small_disk.rglob("*"))
        fill_up(small_disk / "filler")
        response = client.get("/v2/x/manifests/v1")
        assert (response.status_code, response.headers["docker-content-digest"]) == (200, manifest)
        (small_disk / "filler").unlink()
    assert sorted(small_disk.rglob("*")) == before


def test_disk_full_mid_fill_lets_the_other_workers_go_on(small_disk: Path) -> None:
    """Two workers on one cache; the disk fills up in the middle of the first one's fill,
    whose client then stops reading. The second worker's client must not wait on that dead
    spool (it did until the first client left, or 60 s after): the spool goes at once, its
    space with it, and the second worker streams the blob itself."""
    big = os.urandom(48 * 1024 * 1024)
    with fake_upstream() as upstream, ExitStack() as stack:
        digest = upstream.add_blob(big)
        first, second = (
            stack.enter_context(serve_app(mirror_of(upstream, small_disk))) for _ in range(2)
        )
        stalled = stack.enter_context(httpx.stream("GET", f"{first}/v2/x/blobs/{digest}"))
        assert stalled.status_code == 200
        pieces = stalled.iter_raw()  # kept: a generator dropped would close the connection
        next(pieces)  # one piece, then no more reading
        spool = small_disk / "edgeproxy" / "fills" / f"{digest.replace(':', '-')}.partial"
        assert wait_until(lambda: not spool.exists() or spool.stat().st_size > 1024 * 1024)
        # Following it (cut off when its bytes stop being the blob's), or filling it anew.
        with httpx.Client(base_url=second, timeout=45) as client:
            result = fetch(client, f"/v2/x/blobs/{digest}")
            if not result[2]:  # a client retries a cut download
                result = fetch(client, f"/v2/x/blobs/{digest}")
            assert result == (200, big, True)
        stalled.close()
        assert wait_until(lambda: verify_cache(small_disk).leftovers == [])


@pytest.fixture
def full_on_the_last_write(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, bool]]:
    """The first spool written gets ENOSPC on the write that would complete it: the disk fills
    up at the end of a layer, once the whole body has been read from the upstream."""
    original = FilePartialBlob.write
    state = {"failed": False}
    first: list[FilePartialBlob] = []
    written = [0]

    def write(self: FilePartialBlob, data: bytes | bytearray) -> None:
        first[:] = first or [self]
        if self is first[0]:
            if written[0] + len(data) >= len(BIG):
                state["failed"] = True
                raise OSError(errno.ENOSPC, "No space left on device")
            written[0] += len(data)
        original(self, data)

    monkeypatch.setattr(FilePartialBlob, "write", write)
    yield state


def test_a_failed_write_awaited_before_its_callback_stops_the_spooling() -> None:
    """A write's future that failed is awaited before its done callbacks have run (they are
    only scheduled): the fill must stop spooling there, or it commits the spool without the
    failed block (under load, a 48 MiB blob was cached and served 1 MiB short)."""

    async def spooling_after_the_failure() -> bool:
        fill = Fill("sha256:" + "0" * 64, "x")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_exception(OSError(errno.ENOSPC, "No space left on device"))
        await _settle(fill, future)
        return fill.spooling

    assert asyncio.run(spooling_after_the_failure()) is False


def test_a_spool_failing_on_its_last_write_is_dropped_too(
    tmp_path: Path, full_on_the_last_write: dict[str, bool]
) -> None:
    """The spool was dropped only when a block came after its failure: failing on the last
    writes, it kept its lock while a client stalled, and another worker's client waited on
    it; a client joining in this worker got a cut 200 (the spool refused, the window gone)."""
    with fake_upstream() as upstream, ExitStack() as stack:
        digest = upstream.add_blob(BIG)
        first, second = (
            stack.enter_context(serve_app(mirror_of(upstream, tmp_path))) for _ in range(2)
        )
        stalled = stack.enter_context(httpx.stream("GET", f"{first}/v2/x/blobs/{digest}"))
        pieces = stalled.iter_raw()  # kept: a generator dropped would close the connection
        next(pieces)  # one piece, then no more reading
        assert wait_until(lambda: full_on_the_last_write["failed"])
        for url in (first, second):  # this worker, and another
            with httpx.Client(base_url=url, timeout=45) as client:
                result = fetch(client, f"/v2/x/blobs/{digest}")
                if not result[2]:  # a client retries a cut download
                    result = fetch(client, f"/v2/x/blobs/{digest}")
                assert result == (200, BIG, True), url
        stalled.close()
        assert wait_until(lambda: verify_cache(tmp_path).leftovers == [])


def test_a_fill_cancelled_while_its_spool_is_dropped_aborts_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cancels a fill while the dropped spool's abort runs in its thread: the fill's
    own clean-up aborted it again in another thread at the same time (both could close the
    same descriptors)."""
    aborts = []
    writes = [0]
    original_abort = FilePartialBlob.abort

    def write(self: FilePartialBlob, block: bytes | bytearray) -> None:
        writes[0] += 1
        if writes[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    def abort(self: FilePartialBlob) -> None:
        aborts.append(self)
        time.sleep(0.3)  # a busy disk: the cancellation comes meanwhile
        original_abort(self)

    monkeypatch.setattr(FilePartialBlob, "write", write)
    monkeypatch.setattr(FilePartialBlob, "abort", abort)

    async def main(upstream: FakeUpstream, digest: str) -> None:
        app = mirror_of(upstream, tmp_path)
        target = resolve_target("x", None, list(app.config.upstream))
        try:
            async with asyncio.timeout(30):
                fill = app.blobs._download(Fill(digest, "x"), app.upstreams["fake"], target)
                task = asyncio.create_task(fill)
                while not aborts:
                    await asyncio.sleep(0.005)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await asyncio.sleep(0.5)  # a second abort would have started by now
        finally:
            await app.aclose()

    with fake_upstream() as upstream:
        asyncio.run(main(upstream, upstream.add_blob(os.urandom(4 * CHUNK))))
    assert len(aborts) == 1


async def cold_fill(app: MirrorApp, digest: str) -> Fill:
    """The fill of `digest` in repository x, as a client's GET starts it."""
    target = resolve_target("x", None, list(app.config.upstream))
    return await app.blobs.fill(app.upstreams["fake"], target, digest)


def test_a_shutdown_during_the_commit_never_commits_another_workers_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 1 is cancelled (shutdown, a reload) while its commit's fsync runs in a thread.
    Its clean-up aborted the spool in a second thread meanwhile: the lock went, worker 2
    began a fill of its own at the same spool path, and worker 1's commit then renamed
    worker 2's unfinished spool into place: a partial blob, visible, never verified."""
    real_fsync = os.fsync
    in_fsync = threading.Event()

    def slow_fsync(fd: int) -> None:  # a big spool on a busy disk: fsync takes a while
        real_fsync(fd)
        in_fsync.set()
        time.sleep(0.5)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    blob = os.urandom(4 * CHUNK)

    async def main(upstream: FakeUpstream, digest: str) -> FilesystemStorage:
        first = mirror_of(upstream, tmp_path)
        second = FilesystemStorage(tmp_path)  # another worker's storage on the same root
        fill = await cold_fill(first, digest)
        while not in_fsync.is_set():
            await asyncio.sleep(0.005)
        closing = asyncio.create_task(first.aclose())  # shutdown: cancels the fill
        # Worker 2 gets the lock as soon as the abort released it, and spools its first MiB.
        partial = None
        while partial is None and not (closing.done() and second.blob_size(digest)):
            await asyncio.sleep(0.005)
            partial = second.try_begin_blob(digest)
        if partial is not None:
            partial.write(blob[:CHUNK])
        await closing
        assert not fill.committed
        # asyncio.run (as the worker's exit) waits for the commit thread to finish.
        return second

    with fake_upstream() as upstream:
        digest = upstream.add_blob(blob)
        second = asyncio.run(main(upstream, digest))
    size = second.blob_size(digest)
    report = verify_cache(tmp_path)
    assert size in (None, len(blob)), f"a {size}-byte blob is visible for a {len(blob)}-byte digest"
    assert report.corrupt == []


def test_a_write_failing_then_space_coming_back_never_shifts_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is full for one write (ENOSPC, nothing written), then has room again (another
    fill dropped its spool, an eviction ran): the writes queued behind the failed one landed
    at the spool's end, a block early, and a Range reader behind the window (an unaligned
    start) read across `fill.written` into them: a complete body with wrong bytes inside."""
    original = FilePartialBlob.write
    count = [0]

    def write(self: FilePartialBlob, data: bytes | bytearray) -> None:
        count[0] += 1
        if count[0] == 3:
            time.sleep(0.3)  # a slow, failing write: the loop queues more behind it
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, data)

    monkeypatch.setattr(FilePartialBlob, "write", write)
    blob = os.urandom(24 * CHUNK)
    start = 100  # e.g. containerd resuming a download

    async def main(upstream: FakeUpstream, digest: str) -> bytes:
        app = mirror_of(upstream, tmp_path)
        try:
            fill = await cold_fill(app, digest)
            # The first blocks are on disk and out of the window; the third write is failing.
            while not (fill.written >= 2 * CHUNK and fill.in_memory(0, 1) is None):
                await asyncio.sleep(0.001)
            body = bytearray()
            pieces = app.blobs.read_fill(fill, start, None)
            body += await anext(pieces)  # [100, 1 MiB + 100) from the spool
            while not fill.spool_dropped:  # the queued writes have landed by now
                await asyncio.sleep(0.005)
            async for piece in pieces:  # ends normally: a complete body
                body += piece
            return bytes(body)
        finally:
            await app.aclose()

    with fake_upstream() as upstream:
        body = asyncio.run(main(upstream, upstream.add_blob(blob)))
    assert len(body) == len(blob) - start
    wrong = [i + start for i in range(len(body)) if body[i] != blob[i + start]]
    assert wrong == [], f"{len(wrong)} wrong bytes from {wrong[0]} to {wrong[-1]}"


def test_a_follower_never_ends_a_wrong_spool_as_a_complete_blob(tmp_path: Path) -> None:
    """Worker B follows worker A's fill of wrong bytes (same length); B's client has all but
    the last byte of A's spool. A's digest check fails and it aborts; worker C commits the
    right blob before B's next look (3 ms). B found the lock free and a blob in place, took
    it for A's commit, and gave its client the last byte: a whole wrong blob, complete."""
    blob = os.urandom(CHUNK // 2)
    wrong = bytes(255 - b for b in blob)

    async def main(upstream: FakeUpstream, digest: str) -> bytes:
        a = FilesystemStorage(tmp_path)
        spool_a = a.try_begin_blob(digest)
        assert spool_a is not None
        spool_a.announce(len(blob))
        spool_a.write(wrong)
        b = mirror_of(upstream, tmp_path)
        try:
            fill = await cold_fill(b, digest)
            while fill.written < len(blob):
                await asyncio.sleep(0.001)
            pieces = b.blobs.read_fill(fill, 0, None)
            body = bytearray()
            while len(body) < len(blob) - 1:
                body += await anext(pieces)
            # Between two of B's looks: A fails its digest check, C fills and commits.
            spool_a.abort()
            c = FilesystemStorage(tmp_path)
            spool_c = c.try_begin_blob(digest)
            assert spool_c is not None
            spool_c.announce(len(blob))
            spool_c.write(blob)
            spool_c.commit(len(blob))
            try:
                async with asyncio.timeout(10):
                    async for piece in pieces:
                        body += piece
            except RegistryError:
                return b"cut short"  # the client retries: fine
            return bytes(body)
        finally:
            await b.aclose()

    with fake_upstream() as upstream:
        body = asyncio.run(main(upstream, upstream.add_blob(blob)))
    assert body != wrong, "a complete body of the wrong bytes"


def test_a_follower_that_takes_over_keeps_its_slow_reader(tmp_path: Path) -> None:
    """Worker B follows worker A's fill, whose spool is still empty; B's client opens A's
    spool. A fails before writing anything and B fetches the blob itself. B's client kept
    A's dead, empty spool: once behind B's window it read nothing there and was cut ("the
    fill was replaced"), though B's own spool held every byte."""
    blob = os.urandom(16 * CHUNK)

    async def main(upstream: FakeUpstream, digest: str) -> bytes:
        a = FilesystemStorage(tmp_path)
        spool_a = a.try_begin_blob(digest)
        assert spool_a is not None
        spool_a.announce(len(blob))
        b = mirror_of(upstream, tmp_path)
        try:
            fill = await cold_fill(b, digest)
            pieces = b.blobs.read_fill(fill, 0, None)

            async def first_piece() -> bytes | memoryview:
                return await anext(pieces)  # opens A's spool, waits for bytes

            first = asyncio.create_task(first_piece())
            await asyncio.sleep(0.05)
            spool_a.abort()  # A's upstream failed before its first block
            body = bytearray(await first)
            while not fill.done:  # a client slower than the upstream
                await asyncio.sleep(0.01)
            async for piece in pieces:
                body += piece
            return bytes(body)
        finally:
            await b.aclose()

    with fake_upstream() as upstream:
        body = asyncio.run(main(upstream, upstream.add_blob(blob)))
    assert body == blob


def test_a_cached_blob_that_cannot_be_opened_is_a_clear_503(
    mirror: tuple[MirrorApp, httpx.Client],
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Out of descriptors (or a failing disk) when a warm blob is opened: a 503 that says why,
    and an error line (it was a 500 UNKNOWN and a traceback)."""
    app, client = mirror
    digest = upstream.add_blob(b"warm layer")
    assert fetch(client, f"/v2/x/blobs/{digest}") == (200, b"warm layer", True)
    assert wait_until(lambda: app.storage.blob_size(digest) is not None)

    def out_of_descriptors(digest: str) -> NoReturn:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(app.storage, "open_blob", out_of_descriptors)
    refused = client.get(f"/v2/x/blobs/{digest}")
    assert refused.status_code == 503
    error = refused.json()["errors"][0]
    assert (error["code"], error["message"]) == (
        "UNAVAILABLE",
        "the cache cannot be read: Too many open files",
    )
    assert any(f"cannot open {digest}" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)


def test_a_cdns_401_is_not_taken_for_the_upstreams_challenge(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    """A blob sent to a CDN that answers 401 (an expired signed URL): that blob is refused,
    but the CDN's challenge must not become the upstream's, or every later request of the
    worker would first ask the CDN's token realm."""
    app, client = mirror
    redirected, other = upstream.add_blob(b"sent to the cdn"), upstream.add_blob(b"other")
    with fake_upstream() as cdn:
        cdn.faults["/signed"] = 401
        upstream.faults[redirected] = f"redirect {cdn.url}/signed"
        assert client.get(f"/v2/x/blobs/{redirected}").status_code == 403
        assert app.upstreams["fake"]._challenge is None
        assert fetch(client, f"/v2/x/blobs/{other}") == (200, b"other", True)
        for scheme in ("ftp", "file"):  # only http and https are followed
            upstream.faults[redirected] = f"redirect {scheme}://127.0.0.1/signed"
            refused = client.get(f"/v2/x/blobs/{redirected}")
            assert refused.status_code == 503
            assert f"a redirect to {scheme}: not followed" in refused.text


def test_a_redirected_manifests_401_is_not_taken_for_the_upstreams_challenge(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    """As a CDN's 401 for a blob: a manifest or tags list the upstream sends elsewhere, which
    answers 401, is refused, and the upstream's own challenge (none here) stays."""
    app, client = mirror
    other = upstream.add_manifest("other", [upstream.add_blob(b"layer")])
    with fake_upstream() as elsewhere:
        elsewhere.faults["/signed"] = 401
        upstream.faults["/manifests/v1"] = f"redirect {elsewhere.url}/signed"
        upstream.faults["/tags/list"] = f"redirect {elsewhere.url}/signed"
        for path in ("/v2/x/manifests/v1", "/v2/x/tags/list"):
            assert client.get(path).status_code == 403, path
        assert app.upstreams["fake"]._challenge is None
        assert client.get(f"/v2/x/manifests/{other}").status_code == 200


@pytest.mark.parametrize("refusal", [404, 412, 451])
def test_a_refusal_in_one_repository_fails_only_its_clients(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream, refusal: int
) -> None:
    """A fill started through a repository the upstream refuses (a name a client made up, a
    Harbor project whose policy blocks the image: 412) must not fail a repository the
    upstream confirmed meanwhile: it fetches on its own."""
    app, client = mirror
    digest = upstream.add_blob(b"a layer of `real`")
    upstream.faults[f"/bogus/blobs/{digest}"] = refusal
    respond = upstream._respond

    async def refuse_once_real_joined(writer: Any, method: str, path: str) -> None:
        if path == f"/v2/bogus/blobs/{digest}":  # `real` joins the fill while this is out
            fills = app.blobs._fills  # the mirror's, in its own thread: only looked at
            while digest not in fills or "real" not in fills[digest].names:
                await asyncio.sleep(0.01)
        await respond(writer, method, path)

    upstream._respond = refuse_once_real_joined  # type: ignore[method-assign]
    with ThreadPoolExecutor(2) as pool:
        bogus = pool.submit(client.get, f"/v2/bogus/blobs/{digest}")
        assert wait_until(lambda: upstream.requests[f"GET /v2/bogus/blobs/{digest}"] == 1)
        real = pool.submit(client.get, f"/v2/real/blobs/{digest}")
        assert bogus.result().status_code == refusal
        assert (real.result().status_code, real.result().content) == (200, b"a layer of `real`")


LOOP_PATHS = ["/v2/x/manifests/v1", "/v2/x/tags/list", "/v2/x/blobs/{digest}"]


@pytest.mark.parametrize("path", LOOP_PATHS)
@pytest.mark.parametrize(("status", "code"), [(500, "UNAVAILABLE"), (429, "TOOMANYREQUESTS")])
def test_error_loops_are_not_retried(
    mirror: tuple[MirrorApp, httpx.Client],
    upstream: FakeUpstream,
    path: str,
    status: int,
    code: str,
) -> None:
    app, client = mirror
    path = path.format(digest=upstream.add_blob(BLOB))
    upstream.faults[path] = status
    for _ in range(5):
        response = client.get(path)
        assert response.json()["errors"][0]["code"] == code
    # And a HEAD (the tags list takes only GET, as registry:2's).
    method = "GET" if path.endswith("/tags/list") else "HEAD"
    assert client.request(method, path).status_code == (503 if status == 500 else 429)
    # One upstream request per client request (a manifest's is a HEAD), never a retry.
    assert upstream.requests[f"GET {path}"] + upstream.requests[f"HEAD {path}"] == 6
    report = verify_cache(app.config.root)
    assert (report.blobs, report.leftovers) == (0, [])


@pytest.mark.parametrize("path", LOOP_PATHS)
def test_a_401_loop_ends_in_denied(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream, path: str
) -> None:
    """An upstream that answers 401 whatever token it issued: one token, one retry, 403."""
    app, client = mirror
    upstream.tokens = set()
    path = path.format(digest=upstream.add_blob(BLOB))
    upstream.faults[path] = 401
    for attempt in range(1, 4):
        response = client.get(path)
        assert response.status_code == 403
        assert response.json()["errors"][0]["code"] == "DENIED"
        asked = upstream.requests[f"GET {path}"] + upstream.requests[f"HEAD {path}"]
        assert asked <= 2 * attempt
    assert upstream.requests["GET /token"] <= 3 + 1  # one per attempt, and maybe the probe's
    assert verify_cache(app.config.root).leftovers == []


def test_token_server_errors(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    _, client = mirror
    upstream.tokens = set()
    upstream.faults["/token"] = 500
    response = client.get("/v2/x/manifests/v1")
    assert response.status_code == 503
    assert "token server" in response.json()["errors"][0]["message"]
    del upstream.faults["/token"]
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    assert client.get("/v2/x/manifests/v1").headers["docker-content-digest"] == digest


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b"[]",
        b'"t1"',
        b"null",
        b"{}",
        b'{"token": {"a": 1}}',
        b'{"token": "t1", "expires_in": [1]}',
        b'{"token": "t\\u00f6k"}',  # would be cached, then fail every request's header: a 500
        b'{"token": "t1\\r\\nX-Injected: 1"}',
        b'{"token": "t 1"}',
    ],
)
def test_token_answers_without_a_usable_token(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream, answer: bytes
) -> None:
    _, client = mirror
    upstream.tokens = set()
    upstream.token_answer = answer
    upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    for _ in range(2):
        response = client.get("/v2/x/manifests/v1")
        assert response.status_code == 503, response.text
        assert "token server sent no usable token" in response.json()["errors"][0]["message"]


def test_a_token_answer_over_1_mib_is_refused(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream
) -> None:
    """Manifests and tags stop at 4 MiB; a token answer was read whole, however big."""
    _, client = mirror
    upstream.tokens = {"big"}
    upstream.token_answer = json.dumps({"pad": "x" * 2 * 1024 * 1024, "token": "big"}).encode()
    upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    response = client.get("/v2/x/manifests/v1")
    assert response.status_code == 503
    assert "token server: answer over 1 MiB" in response.json()["errors"][0]["message"]


@pytest.mark.parametrize("where", ["realm", "redirect"])
@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/x", "http://[::1/x", "http://\u2603/x"])
def test_urls_no_socket_can_reach(
    mirror: tuple[MirrorApp, httpx.Client], upstream: FakeUpstream, where: str, url: str
) -> None:
    """A token realm or a redirect to a port past 65535 was a 500 (anyio's OverflowError is
    no httpx.HTTPError); it is a 503 as any upstream that cannot be reached. So is a blob
    sent to a CDN URL that does not parse (http.client's ValueError was a 500 too)."""
    _, client = mirror
    blob = upstream.add_blob(b"layer")
    paths = ("/v2/x/manifests/v1", "/v2/x/tags/list", f"/v2/x/blobs/{blob}")
    if where == "realm":
        upstream.tokens, upstream.realm = set(), url
    else:
        for path in paths:
            upstream.faults[path] = f"redirect {url}"
    for path in paths:
        response = client.get(path)
        assert response.status_code == 503, response.text
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"


def test_the_token_tables_stay_bounded(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A token and a lock per repository name were kept for ever: a client naming ever new
    repositories grew the upstream client's tables without bound."""
    upstream.tokens = set()
    app = mirror_of(upstream, tmp_path)

    async def run() -> dict[str, object]:
        client = app.upstreams["fake"]
        try:
            for n in range(300):
                await client.request("GET", f"/v2/r{n}/tags/list", f"r{n}")
            return vars(client)
        finally:
            await app.aclose()

    tables = [value for value in asyncio.run(run()).values() if isinstance(value, dict)]
    assert upstream.issued == 300
    assert max(len(table) for table in tables) <= 256


def test_upstream_down_at_start_then_up(tmp_path: Path) -> None:
    port = free_port()
    with fake_upstream(port) as stand_in:
        pass  # stopped: its URL is the one the mirror is configured with, and nothing listens
    app = mirror_of(stand_in, tmp_path / "cache")
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for path in ("/v2/x/manifests/v1", f"/v2/x/blobs/sha256:{'0' * 64}"):
            down = client.get(path)
            assert down.status_code == 503, path
            assert down.json()["errors"][0]["code"] == "UNAVAILABLE"
        with fake_upstream(port) as upstream:
            upstream.tokens = set()  # the challenge is learnt now, not at the (failed) start
            digest = upstream.add_blob(BLOB)
            upstream.add_manifest("v1", [digest])
            assert client.get("/v2/x/manifests/v1").status_code == 200
            assert fetch(client, f"/v2/x/blobs/{digest}") == (200, BLOB, True)
            # The manifest and the layer (registry:2 keeps manifests among the blobs).
            assert wait_until(lambda: verify_cache(app.config.root).blobs == 2)


def bursts(app: MirrorApp, *sizes: int) -> list[list[tuple[Manifest, str]]]:
    """Bursts of concurrent GETs of x:v1 inside the app, one after another; in each, every
    client asks before any answer comes."""
    target = resolve_target("x", None, list(app.config.upstream))

    async def run() -> list[list[tuple[Manifest, str]]]:
        client = app.upstreams["fake"]
        try:
            return [
                await asyncio.gather(
                    *(app.manifests.get(client, target, "v1") for _ in range(size))
                )
                for size in sizes
            ]
        finally:
            await app.aclose()

    return asyncio.run(run())


def test_concurrent_clients_of_a_cold_tag_share_one_head_and_one_get(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    [got] = bursts(mirror_of(upstream, tmp_path / "cache"), 8)
    assert {(manifest.digest, status) for manifest, status in got} == {
        (digest, "edgeproxy; fwd=miss")
    }
    assert upstream.requests[f"GET /v2/x/manifests/{digest}"] == 1
    assert upstream.requests["HEAD /v2/x/manifests/v1"] == 1


def test_concurrent_revalidations_of_a_tag_share_one_head(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """tag_ttl 0: every request revalidates, but those that come while a HEAD for the same tag
    is out take its answer (as nginx's proxy_cache_lock shares one fill). The answer is not
    kept: each burst asks again."""
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    _, *revalidated = bursts(mirror_of(upstream, tmp_path / "cache"), 1, 8, 8)
    assert {status for burst in revalidated for _, status in burst} == {
        "edgeproxy; fwd=stale; fwd-status=200"
    }
    assert upstream.requests["HEAD /v2/x/manifests/v1"] == 3
    assert upstream.requests[f"GET /v2/x/manifests/{digest}"] == 1


def test_a_shared_head_that_fails_serves_every_client_stale(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    bursts(mirror_of(upstream, tmp_path / "cache"), 1)
    upstream.faults["/manifests/v1"] = 500
    [got] = bursts(mirror_of(upstream, tmp_path / "cache"), 8)
    assert {(m.digest, status) for m, status in got} == {(digest, "edgeproxy; hit; detail=stale")}
    assert upstream.requests["HEAD /v2/x/manifests/v1"] == 2


def test_a_kept_alive_connection_closed_unanswered_is_asked_again(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """An upstream (or a proxy: tinyproxy) that answers as if it kept the connection, then
    closes it when the next request comes: the next manifest or tags request failed with
    "Server disconnected without sending a response" (a 503). A GET or HEAD that got nothing
    back goes again on a new connection, as Go's client sends it."""
    upstream.answer_headers[""] = {"Connection": "keep-alive"}
    upstream.closes_when_reused = True
    upstream.add_manifest("a", [upstream.add_blob(b"layer")])
    with serve_app(mirror_of(upstream, tmp_path)) as url, httpx.Client(base_url=url) as client:
        for path in ("/v2/x/tags/list", "/v2/x/manifests/a", "/v2/x/tags/list"):
            assert client.get(path).status_code == 200, path

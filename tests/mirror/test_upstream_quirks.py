"""Upstreams that behave unlike the registry:2 the other tests mostly use, as real registries
and the CDNs behind them do: HEADs refused, 4xx errors of their own, no referrers API, a token
realm with a query string, odd blob answers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from edgeproxy.config import config_from_dict
from edgeproxy.mirror.app import MirrorApp
from edgeproxy.mirror.cache_status import MISS, REVALIDATED, STALE
from tests.mirror.fake_upstream import MANIFEST_TYPE, digest_of
from tests.support.servers import serve_app

LAYER = b"layer bytes " * 1000
LAYER_DIGEST = digest_of(LAYER)


def manifest(note: str) -> bytes:
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": LAYER_DIGEST,
              "size": len(LAYER)}  # fmt: skip
    document = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config, "layers": [],
                "annotations": {"note": note}}  # fmt: skip
    return json.dumps(document).encode()


Quirk = Callable[[Request], Response | None]


@dataclass
class Quirky:
    """A registry holding `team/app` (tags, manifests by digest, the one blob), with a `quirk`
    that may answer a request its own way (None: as a plain registry would). Records every
    request as (method, path, query)."""

    tags: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    quirk: Quirk | None = None
    requests: list[tuple[str, str, str]] = field(default_factory=list)

    def tag(self, tag: str, data: bytes) -> str:
        digest = digest_of(data)
        self.manifests[digest] = data
        self.tags[tag] = digest
        return digest

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p.endswith(suffix))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        self.requests.append((request.method, request.url.path, request.url.query))
        response = (self.quirk and self.quirk(request)) or self.answer(request)
        await response(scope, receive, send)

    def answer(self, request: Request) -> Response:
        path = request.url.path
        kind, _, reference = path.rpartition("/")
        if path == "/v2/":
            return JSONResponse({})
        if path.endswith("/tags/list"):
            return JSONResponse({"name": "team/app", "tags": sorted(self.tags)})
        if kind.endswith("/manifests"):
            digest = self.tags.get(reference, reference)
            if digest in self.manifests:
                headers = {"Docker-Content-Digest": digest}
                return Response(self.manifests[digest], media_type=MANIFEST_TYPE, headers=headers)
        if kind.endswith("/blobs") and reference == LAYER_DIGEST:
            return Response(LAYER, media_type="application/octet-stream")
        return JSONResponse({"errors": [{"code": "NOT_FOUND", "message": "?"}]}, status_code=404)


@dataclass
class World:
    upstream: Quirky
    app: MirrorApp
    client: httpx.Client


@contextmanager
def world(tmp_path: Path) -> Iterator[World]:
    upstream = Quirky()
    with serve_app(upstream) as upstream_url:
        entry = {"name": "up", "url": upstream_url}
        config = config_from_dict({"mirror": {"root": str(tmp_path), "upstream": [entry]}})
        app = MirrorApp(config.mirror)
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield World(upstream, app, client)


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    with world(tmp_path) as it:
        yield it


# Manifests: a HEAD the upstream cannot answer, where its GET can


@pytest.mark.parametrize("status", [400, 404, 405, 501])
def test_a_tag_whose_head_fails_is_asked_with_a_get(w: World, status: int) -> None:
    """Some upstreams refuse HEAD (405, 501, a 400 from a proxy in front), and Artifactory's
    or Nexus's proxy repositories answer a HEAD 404 for what their GET would fetch. registry:2
    then asks with a GET (distribution's `tags.Get`); the mirror answered 503 or 404 and a
    cached tag was served stale for ever, never updated."""

    def no_head(request: Request) -> Response | None:
        return Response(status_code=status) if request.method == "HEAD" else None

    w.upstream.quirk = no_head
    first = w.upstream.tag("v1", manifest("first"))
    cold = w.client.get("/v2/team/app/manifests/v1")
    assert (cold.status_code, cold.headers.get("docker-content-digest")) == (200, first), cold.text
    second = w.upstream.tag("v1", manifest("second"))  # the tag moves upstream
    moved = w.client.get("/v2/team/app/manifests/v1")
    assert (moved.status_code, moved.headers["docker-content-digest"]) == (200, second)
    assert moved.headers["cache-status"] == MISS
    assert w.app.storage.read_tag("team/app", "v1")[0] == second  # type: ignore[index]
    # Gone upstream (its GET says so too): the cached tag is served stale, as before.
    del w.upstream.tags["v1"]
    stale = w.client.get("/v2/team/app/manifests/v1")
    assert (stale.status_code, stale.headers["cache-status"]) == (200, STALE)
    unknown = w.client.get("/v2/team/app/manifests/v9")
    assert (unknown.status_code, unknown.json()["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN")


def test_a_head_that_answers_keeps_the_get_for_new_digests_only(w: World) -> None:
    """The fallback is for HEADs that fail: a HEAD with a digest already cached costs no GET."""
    digest = w.upstream.tag("v1", manifest("first"))
    for _ in range(3):
        assert w.client.get("/v2/team/app/manifests/v1").headers["docker-content-digest"] == digest
    assert w.upstream.count("GET", "/manifests/v1") == 0
    assert w.upstream.count("GET", f"/manifests/{digest}") == 1
    assert w.client.get("/v2/team/app/manifests/v1").headers["cache-status"] == REVALIDATED

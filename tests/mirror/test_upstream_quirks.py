"""Upstreams that behave unlike the registry:2 the other tests mostly use, as real registries
and the CDNs behind them do: HEADs refused, 4xx errors of their own, no referrers API, a token
realm with a query string, odd blob answers."""

from __future__ import annotations

import gzip
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
from edgeproxy.mirror.manifests import OCI_INDEX
from tests.mirror.fake_upstream import MANIFEST_TYPE, digest_of
from tests.support.servers import serve_app
from tests.support.wait import wait_until

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
    request as (method, path, query), and its headers."""

    tags: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    quirk: Quirk | None = None
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each request

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
        self.headers.append(dict(request.headers))
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
    known = w.app.storage.read_tag("team/app", "v1")
    assert known is not None and known[0] == second
    # Gone upstream (its GET says so too): the cached tag is served stale, as before.
    del w.upstream.tags["v1"]
    stale = w.client.get("/v2/team/app/manifests/v1")
    assert (stale.status_code, stale.headers["cache-status"]) == (200, STALE)
    unknown = w.client.get("/v2/team/app/manifests/v9")
    assert (unknown.status_code, unknown.json()["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("content_type", ["application/json", f"{MANIFEST_TYPE}; charset=utf-8"])
def test_a_head_without_a_digest_is_asked_with_a_get(w: World, content_type: str) -> None:
    """Some upstreams send no Docker-Content-Digest with a HEAD (or a Content-Type of their
    own): the digest comes from a GET by tag, whose bytes the mirror hashes itself."""

    def no_digest(request: Request) -> Response | None:
        if "/manifests/" not in request.url.path:
            return None
        plain = w.upstream.answer(request)
        headers = {k: v for k, v in plain.headers.items() if k != "docker-content-digest"}
        return Response(plain.body, plain.status_code, {**headers, "content-type": content_type})

    w.upstream.quirk = no_digest
    first = w.upstream.tag("v1", manifest("first"))
    assert w.client.get("/v2/team/app/manifests/v1").headers["docker-content-digest"] == first
    second = w.upstream.tag("v1", manifest("second"))
    moved = w.client.get("/v2/team/app/manifests/v1")
    assert (moved.status_code, moved.headers["docker-content-digest"]) == (200, second)
    assert moved.headers["content-type"] == MANIFEST_TYPE  # what the manifest says it is


def test_a_head_that_answers_keeps_the_get_for_new_digests_only(w: World) -> None:
    """The fallback is for HEADs that fail: a HEAD with a digest already cached costs no GET."""
    digest = w.upstream.tag("v1", manifest("first"))
    for _ in range(3):
        assert w.client.get("/v2/team/app/manifests/v1").headers["docker-content-digest"] == digest
    assert w.upstream.count("GET", "/manifests/v1") == 0
    assert w.upstream.count("GET", f"/manifests/{digest}") == 1
    assert w.client.get("/v2/team/app/manifests/v1").headers["cache-status"] == REVALIDATED


# Upstream 4xx errors of their own

HARBOR_POLICY = (
    "current image with 3 vulnerabilities cannot be pulled due to configured policy in "
    "'Prevent images with vulnerability severity of \"Critical\" or higher from running.'"
)


@pytest.mark.parametrize("status", [400, 405, 410, 412, 451])
def test_an_upstream_4xx_of_its_own_is_passed_on(w: World, status: int) -> None:
    """Harbor refuses a vulnerable image with 412 PROJECTPOLICYVIOLATION and says why; a
    registry refuses a takedown with 451, a deleted repository with 410, a bad query with
    400. The mirror answered each with 503 UNAVAILABLE: the reason was lost, and clients
    that retry a 503 (go-containerregistry, buildkit) retried a refusal that will not change.
    The upstream's status, code and message go on, as a 4xx the client does not retry."""
    digest = w.upstream.tag("v1", manifest("first"))
    body = {"errors": [{"code": "PROJECTPOLICYVIOLATION", "message": HARBOR_POLICY}]}

    def refuse(request: Request) -> Response | None:
        return JSONResponse(body, status_code=status) if request.url.path != "/v2/" else None

    w.upstream.quirk = refuse
    for path in ("/v2/team/app/manifests/v1", f"/v2/team/app/manifests/{digest}",
                 "/v2/team/app/tags/list"):  # fmt: skip
        refused = w.client.get(path)
        assert refused.status_code == status, (path, refused.text)
        error = refused.json()["errors"][0]
        assert error["code"] == "PROJECTPOLICYVIOLATION", path
        assert HARBOR_POLICY in error["message"], path
        assert refused.headers["cache-status"] == f"{MISS}; fwd-status={status}", path
    # A blob's error body is not read (a thread streams it): the status and a code of its own.
    head = w.client.head(f"/v2/team/app/blobs/{LAYER_DIGEST}")
    blob = w.client.get(f"/v2/team/app/blobs/{LAYER_DIGEST}")
    assert (head.status_code, blob.status_code) == (status, status)
    assert blob.json()["errors"][0]["code"] == "UNKNOWN"
    assert not list(w.app.config.root.rglob("data"))  # nothing cached


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>Request blocked</body></html>",
        b'{"errors": [{"code": "not a code", "message": "Request blocked"}]}',
        b'{"errors": "Request blocked"}',
    ],
)
def test_an_upstream_4xx_without_a_registry_error_gets_a_code_of_the_mirror(
    w: World, body: bytes
) -> None:
    """A 400 page from a proxy or firewall in front of the registry, or an error whose code is
    not a registry code: the status goes on, with UNKNOWN and no part of the page."""

    def waf(request: Request) -> Response | None:
        return Response(body, status_code=400) if "/manifests/" in request.url.path else None

    w.upstream.quirk = waf
    refused = w.client.get("/v2/team/app/manifests/v1")
    assert refused.status_code == 400
    assert refused.json()["errors"][0]["code"] == "UNKNOWN"
    assert "blocked" not in refused.text


def test_a_cached_tag_is_still_served_stale_on_an_upstream_4xx(w: World) -> None:
    digest = w.upstream.tag("v1", manifest("first"))
    assert w.client.get("/v2/team/app/manifests/v1").status_code == 200
    w.upstream.quirk = lambda request: JSONResponse({"errors": []}, status_code=410)
    stale = w.client.get("/v2/team/app/manifests/v1")
    assert (stale.status_code, stale.headers["cache-status"]) == (200, STALE)
    assert stale.headers["docker-content-digest"] == digest


# Referrers: the OCI 1.1 tag schema when the upstream has no referrers API


@pytest.mark.parametrize("refusal", ["404", "405", "400", "html"])
def test_an_upstream_without_the_referrers_api_falls_back_to_its_tag_schema(
    w: World, refusal: str
) -> None:
    """An upstream without the API answers 404 (as the spec says), or 405 or 400 (its router
    knows no such path), or 200 with a page that is no index (a catch-all web UI): oras-go
    takes only a 200 labelled as an OCI index for the API. The mirror fell back to the tag
    schema (`sha256-<hex>`) on a 404 only: a 405 or 400 was a 503, the page went on as an
    index."""
    subject = w.upstream.tag("v1", manifest("subject"))
    referrer = {"mediaType": MANIFEST_TYPE, "digest": subject, "size": 1, "artifactType": "a/b"}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [referrer]}
    w.upstream.tag(subject.replace(":", "-"), json.dumps(index).encode())

    def no_api(request: Request) -> Response | None:
        if "/referrers/" not in request.url.path:
            return None
        if refusal == "html":
            return Response(b"<html>Sign in</html>", media_type="text/html")
        return JSONResponse({"errors": []}, status_code=int(refusal))

    w.upstream.quirk = no_api
    answer = w.client.get(f"/v2/team/app/referrers/{subject}")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == OCI_INDEX
    assert answer.json()["manifests"] == [referrer]


# Auth: a token realm with a query string of its own


def test_a_token_realm_keeps_its_own_query(tmp_path: Path) -> None:
    """Some token realms carry a query of their own (a tenant, an account); registry:2 adds
    service and scope to it. httpx 0.28 replaces a URL's query with `params`: the token
    server was asked without its tenant and refused, and every pull was a 403."""
    issued: list[str] = []
    upstream = Quirky()
    digest = upstream.tag("v1", manifest("first"))

    def token_auth(request: Request) -> Response | None:
        if request.url.path == "/token":
            if request.query_params.get("tenant") != "t1":
                return JSONResponse({"details": "which tenant?"}, status_code=401)
            issued.append(str(request.url.query))
            return JSONResponse({"token": "granted", "expires_in": 300})
        if request.headers.get("authorization") != "Bearer granted":
            realm = f"{request.base_url}token?tenant=t1"
            challenge = f'Bearer realm="{realm}",service="up"'
            return JSONResponse({}, status_code=401, headers={"WWW-Authenticate": challenge})
        return None

    upstream.quirk = token_auth
    with serve_app(upstream) as upstream_url:
        entry = {"name": "up", "url": upstream_url}
        config = config_from_dict({"mirror": {"root": str(tmp_path), "upstream": [entry]}})
        with serve_app(MirrorApp(config.mirror)) as url, httpx.Client(base_url=url) as client:
            pulled = client.get("/v2/team/app/manifests/v1")
            assert (pulled.status_code, pulled.headers.get("docker-content-digest")) == (
                200,
                digest,
            ), pulled.text
    assert issued
    query = httpx.QueryParams(issued[-1])
    assert (query["tenant"], query["service"]) == ("t1", "up")
    assert query.get_list("scope") == ["repository:team/app:pull"]


# Blobs: what a CDN may answer


def test_a_whole_blob_in_a_206_nobody_asked_for_is_taken(w: World) -> None:
    """A CDN (a caching layer in front of the store) may answer a GET without Range with 206
    and a Content-Range that covers the whole blob; registry:2 reads it as the blob
    (distribution's HTTPReadSeeker takes any 2xx from offset 0). The mirror answered 503."""

    def partial(request: Request) -> Response | None:
        if request.method != "GET" or not request.url.path.endswith(LAYER_DIGEST):
            return None
        whole = f"bytes 0-{len(LAYER) - 1}/{len(LAYER)}"
        return Response(LAYER, status_code=206, headers={"Content-Range": whole})

    w.upstream.quirk = partial
    blob = w.client.get(f"/v2/team/app/blobs/{LAYER_DIGEST}")
    assert (blob.status_code, blob.content) == (200, LAYER)
    assert wait_until(lambda: w.app.storage.blob_size(LAYER_DIGEST) == len(LAYER))


@pytest.mark.parametrize(
    "content_range", ["bytes 0-99/{size}", "bytes 100-{last}/{size}", "bytes 0-{last}/*", None]
)
def test_a_part_of_a_blob_in_a_206_is_refused(w: World, content_range: str | None) -> None:
    """Only the whole blob will do: a 206 for part of it (or that does not say which) is the
    upstream's fault, a 503 before any byte goes out, and nothing is cached."""
    size, last = len(LAYER), len(LAYER) - 1

    def partial(request: Request) -> Response | None:
        if request.method != "GET" or not request.url.path.endswith(LAYER_DIGEST):
            return None
        headers = {}
        if content_range is not None:
            headers["Content-Range"] = content_range.format(size=size, last=last)
        return Response(LAYER[:100], status_code=206, headers=headers)

    w.upstream.quirk = partial
    refused = w.client.get(f"/v2/team/app/blobs/{LAYER_DIGEST}")
    assert refused.status_code == 503
    assert "206" in refused.json()["errors"][0]["message"]
    assert w.app.storage.blob_size(LAYER_DIGEST) is None


def test_a_cold_blobs_head_without_a_length_does_not_say_zero(w: World) -> None:
    """An upstream HEAD that gives no Content-Length: the mirror meant to answer without one,
    and starlette filled in `Content-Length: 0`, a size a client takes for the blob's."""

    def no_length(request: Request) -> Response | None:
        if request.method != "HEAD" or "/blobs/" not in request.url.path:
            return None
        response = Response(status_code=200, media_type="application/octet-stream")
        del response.headers["content-length"]
        return response

    w.upstream.quirk = no_length
    head = w.client.head(f"/v2/team/app/blobs/{LAYER_DIGEST}")
    assert head.status_code == 200
    assert head.headers["docker-content-digest"] == LAYER_DIGEST
    assert head.headers.get("content-length") != "0"
    blob = w.client.get(f"/v2/team/app/blobs/{LAYER_DIGEST}")
    assert (blob.status_code, blob.content) == (200, LAYER)


def test_a_content_coding_the_mirror_did_not_ask_for_is_decoded(w: World) -> None:
    """The mirror asks for `Accept-Encoding: identity`; a compressing proxy or CDN that gzips
    all the same sent manifests that failed their digest (503), tags lists passed on as gzip
    bytes labelled JSON, blobs that failed their digest. The content is what the coding
    decodes to, as Go's transport (registry:2's) and containerd read it."""
    digest = w.upstream.tag("v1", manifest("first"))

    def gzip_anyway(request: Request) -> Response | None:
        if request.url.path == "/v2/":
            return None
        plain = w.upstream.answer(request)
        headers = {**plain.headers, "Content-Encoding": "gzip"}
        del headers["content-length"]
        return Response(gzip.compress(plain.body), plain.status_code, headers)

    w.upstream.quirk = gzip_anyway
    tags = w.client.get("/v2/team/app/tags/list")
    assert (tags.status_code, tags.json()) == (200, {"name": "team/app", "tags": ["v1"]})
    pulled = w.client.get("/v2/team/app/manifests/v1")
    assert (pulled.status_code, pulled.content) == (200, w.upstream.manifests[digest])
    blob = w.client.get(f"/v2/team/app/blobs/{LAYER_DIGEST}")
    assert (blob.status_code, blob.content) == (200, LAYER)
    assert wait_until(lambda: w.app.storage.blob_size(LAYER_DIGEST) == len(LAYER))
    assert {h.get("accept-encoding") for h in w.upstream.headers} == {"identity"}

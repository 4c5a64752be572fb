"""The registry API surface of the mirror, against an in-process upstream."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest

from edgeproxy.config import config_from_dict
from edgeproxy.mirror.app import MirrorApp
from edgeproxy.mirror.cache_status import HIT
from edgeproxy.mirror.manifests import DOCKER_LIST
from edgeproxy.mirror.storage import FilesystemStorage
from tests.mirror.fake_upstream import MANIFEST_TYPE, FakeUpstream, fake_upstream, mirror_of
from tests.support.servers import serve_app
from tests.support.wait import wait_until


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[FakeUpstream, httpx.Client]]:
    with fake_upstream() as upstream:
        config = config_from_dict(
            {
                "mirror": {
                    "root": str(tmp_path),
                    "headers": {"X-Content-Type-Options": "nosniff"},
                    "upstream": [
                        {"name": "docker.io", "url": upstream.url},
                        {"name": "other.example", "url": upstream.url},
                    ],
                }
            }
        )
        with serve_app(MirrorApp(config.mirror)) as url, httpx.Client(base_url=url) as client:
            yield upstream, client


def test_base_and_common_headers(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    _, client = setup
    response = client.get("/v2/")
    assert (response.status_code, response.json()) == (200, {})
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert response.headers["x-content-type-options"] == "nosniff"
    # OPTIONS (a browser's CORS preflight) is 200 with Allow, as registry:2's method handlers.
    for path, allow in [
        ("/v2/x/manifests/v1", "GET, HEAD"),
        ("/v2/x/blobs/sha256:" + "a" * 64, "GET, HEAD"),
        ("/v2/x/tags/list", "GET"),
        ("/v2/_catalog", "GET"),
    ]:
        options = client.options(path)
        assert (options.status_code, options.content) == (200, b""), path
        assert options.headers["allow"] == allow, path
        assert options.headers["x-content-type-options"] == "nosniff"
    # registry:2's base route answers any method as GET.
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        base = client.request(method, "/v2/")
        assert base.status_code == 200, method
        assert base.content == (b"" if method == "HEAD" else b"{}"), method
    # registry:2 answers `/` for load balancers' liveness probes, whatever the method.
    for method in ("GET", "HEAD", "POST"):
        alive = client.request(method, "/")
        assert (alive.status_code, alive.content) == (200, b""), method
        assert alive.headers["cache-control"] == "no-cache"


def test_a_path_off_by_a_slash_is_moved(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    """As registry:2's router: a 301 to the route's own path, the query kept, for any method
    (tests/e2e/test_mirror_parity.py holds the real registry to it)."""
    upstream, client = setup
    blob = "/v2/x/blobs/sha256:" + "a" * 64
    for path, location in [
        ("/v2", "/v2/"),
        ("/v2?ns=docker.io&a=%2F", "/v2/?ns=docker.io&a=%2F"),
        ("/v2/x/manifests/v1/", "/v2/x/manifests/v1"),
        (blob + "/", blob),
        ("/v2/a/b/tags/list/?n=1", "/v2/a/b/tags/list?n=1"),
        ("/v2/_catalog/", "/v2/_catalog"),
    ]:
        for method in ("GET", "HEAD", "DELETE"):
            response = client.request(method, path)
            assert response.status_code == 301, (method, path)
            assert response.headers["location"] == location, (method, path)
            assert response.headers["docker-distribution-api-version"] == "registry/2.0"
        assert (
            client.get(path).text
            == f'<a href="{location.replace("&", "&amp;")}">Moved Permanently</a>.\n\n'
        )
    # Not a route without its slash either: not moved.
    for path in ("/v2/UP/manifests/v1/", "/v2/x/blobs/sha256:zz/", "/v2//", "/v2/x/"):
        assert client.get(path).status_code in (400, 404), path
    # A push starts on a route whose slash is its own: refused as every write.
    assert client.post("/v2/x/blobs/uploads/").status_code == 405
    assert sum(upstream.requests.values()) == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/x/blobs/uploads/"),
        ("PUT", "/v2/x/manifests/v1"),
        ("DELETE", "/v2/x/manifests/v1"),
        ("PATCH", "/v2/x/blobs/uploads/abc"),
        ("DELETE", "/v2/x/blobs/sha256:" + "a" * 64),
        ("PUT", "/v2/x/tags/list"),
        ("DELETE", "/v2/_catalog"),
    ],
)
def test_writes_are_unsupported(
    setup: tuple[FakeUpstream, httpx.Client], method: str, path: str
) -> None:
    _, client = setup
    response = client.request(method, path, content=b"{}")
    assert response.status_code == 405
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    lists = path.endswith(("/tags/list", "/_catalog"))
    assert response.headers["allow"] == ("GET" if lists else "GET, HEAD")


def test_lists_take_no_head(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    """registry:2 routes tags/list and _catalog for GET only: a HEAD is a 405 (nothing is
    asked upstream)."""
    upstream, client = setup
    for path in ("/v2/x/tags/list", "/v2/_catalog"):
        response = client.head(path)
        assert (response.status_code, response.headers["allow"]) == (405, "GET"), path
    assert upstream.requests["GET /v2/library/x/tags/list"] == 0


def test_bad_names_and_digests(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    _, client = setup
    for path, code in [
        ("/v2/%2e%2e/etc/manifests/v1", "NAME_INVALID"),
        ("/v2/UP/manifests/v1", "NAME_INVALID"),
        ("/v2/x/blobs/sha256:zz", "DIGEST_INVALID"),
        ("/v2/x/manifests/-bad", "TAG_INVALID"),
    ]:
        response = client.get(path)
        assert response.status_code == 400, path
        assert response.json()["errors"][0]["code"] == code


def test_sha384_and_sha512_content_is_unknown(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    """registry:2 answers 404 for a sha384 or sha512 digest it lacks (400 is for a malformed
    one); the cache holds sha256 content only, so none is asked upstream. A referrers query
    goes upstream: the subject digest is only a key there."""
    upstream, client = setup
    for digest in ("sha384:" + "a" * 96, "sha512:" + "b" * 128):
        for kind, code in [("manifests", "MANIFEST_UNKNOWN"), ("blobs", "BLOB_UNKNOWN")]:
            response = client.get(f"/v2/x/{kind}/{digest}")
            assert response.status_code == 404, (kind, digest)
            assert response.json()["errors"][0]["code"] == code
            assert client.head(f"/v2/x/{kind}/{digest}").status_code == 404
        upstream.referrers[digest] = [{"digest": "sha256:" + "c" * 64}]
        referrers = client.get(f"/v2/x/referrers/{digest}")
        assert referrers.json()["manifests"] == upstream.referrers[digest]
    assert not [r for r in upstream.requests if "/manifests/" in r or "/blobs/" in r]
    for malformed in ("sha512:" + "b" * 127, "sha512:" + "B" * 128, "md5:" + "d" * 32):
        assert client.get(f"/v2/x/blobs/{malformed}").status_code == 400, malformed


def test_the_name_limit_is_the_upstreams(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    """A name the upstream would be asked for over 255 characters is NAME_INVALID here: with
    Docker Hub's `library/` (registry:2 never adds it: its client sends it), not with the
    prefix that picks an upstream (the upstream never sees it)."""
    upstream, client = setup
    too_long = client.get("/v2/" + "a" * 248 + "/manifests/v1")
    assert too_long.status_code == 400
    assert too_long.json()["errors"][0]["code"] == "NAME_INVALID"
    assert not upstream.requests
    upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    prefixed = client.get("/v2/other.example/" + "a" * 255 + "/manifests/v1")
    assert prefixed.status_code == 200
    assert upstream.requests["HEAD /v2/" + "a" * 255 + "/manifests/v1"] == 1


def test_manifest_headers_head_and_conditional(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    upstream, client = setup
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    body = upstream.manifests[digest]
    got = client.get("/v2/library/x/manifests/v1")
    assert got.content == body
    assert got.headers["docker-content-digest"] == digest
    assert got.headers["etag"] == f'"{digest}"'
    assert got.headers["content-type"] == MANIFEST_TYPE
    assert got.headers["content-length"] == str(len(body))
    head = client.head(f"/v2/library/x/manifests/{digest}")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len(body))
    assert head.headers["cache-status"] == "edgeproxy; hit"
    unchanged = client.get(f"/v2/x/manifests/{digest}", headers={"If-None-Match": f'"{digest}"'})
    assert unchanged.status_code == 304
    # `*` is no digest: registry:2 sends the manifest (its blobs' `*` is Go's ServeContent's 304).
    for method in ("GET", "HEAD"):
        star = client.request(method, "/v2/x/manifests/v1", headers={"If-None-Match": "*"})
        assert (star.status_code, star.headers["etag"]) == (200, f'"{digest}"'), method
    assert client.get("/v2/x/manifests/v1", headers={"If-None-Match": "*"}).content == body
    # "x" on Docker Hub is "library/x": the same cached repository, fetched once.
    assert upstream.requests["GET /v2/library/x/manifests/" + digest] == 1


def test_upstream_selection_by_ns_and_prefix(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    upstream, client = setup
    upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    by_ns = client.get("/v2/team/app/manifests/v1?ns=other.example")
    assert by_ns.status_code == 200
    assert by_ns.headers["oci-namespace"] == "other.example"
    in_capitals = client.get("/v2/team/app/manifests/v1?ns=Other.Example")
    assert in_capitals.headers["oci-namespace"] == "Other.Example"  # as the client sent it
    assert in_capitals.content == by_ns.content
    by_prefix = client.get("/v2/other.example/team/app/manifests/v1")
    assert by_prefix.status_code == 200
    gets = [r for r in upstream.requests if r.startswith("GET /v2/team/app/manifests/")]
    assert [upstream.requests[r] for r in gets] == [1]  # the second was only revalidated
    unknown = client.get("/v2/team/app/manifests/v1?ns=evil.example")
    assert unknown.status_code == 404
    assert unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    catalog = client.get("/v2/_catalog").json()
    assert catalog == {"repositories": ["other.example/team/app"]}


def test_the_catalog_comes_in_pages_of_100_as_registry2s(tmp_path: Path) -> None:
    hub = {"name": "docker.io", "url": "http://127.0.0.1:1"}
    config = config_from_dict({"mirror": {"root": str(tmp_path), "upstream": [hub]}})
    app = MirrorApp(config.mirror)
    names = [f"team/app{i:03}" for i in range(150)]
    for name in names:
        app.storage.write_tag(name, "v1", "sha256:" + "a" * 64)
    with serve_app(app) as url, httpx.Client(base_url=url) as client:
        first = client.get("/v2/_catalog")
        assert first.json() == {"repositories": names[:100]}
        assert first.headers["link"] == '</v2/_catalog?last=team/app099&n=100>; rel="next"'
        rest = client.get("/v2/_catalog?last=team/app099&n=100")
        assert rest.json() == {"repositories": names[100:]}
        assert "link" not in rest.headers


def test_tags_catalog_and_referrers(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    upstream, client = setup
    layer = upstream.add_blob(b"layer")
    for tag in ("a", "b", "c"):
        upstream.add_manifest(tag, [layer])
    assert client.get("/v2/x/tags/list").json() == {"name": "x", "tags": ["a", "b", "c"]}
    for name in ("one/x", "two/x", "three/x"):
        client.get(f"/v2/{name}/manifests/a")
    page = client.get("/v2/_catalog?n=2")
    assert page.json() == {"repositories": ["one/x", "three/x"]}
    assert page.headers["link"] == '</v2/_catalog?last=three/x&n=2>; rel="next"'
    assert client.get("/v2/_catalog?last=three/x").json() == {"repositories": ["two/x"]}
    too_many = client.get("/v2/_catalog?n=1001")  # registry:2's catalog.maxentries
    assert too_many.status_code == 400
    assert too_many.json()["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
    referrers = client.get(f"/v2/x/referrers/{layer}")
    assert referrers.status_code == 200
    assert referrers.json() == {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
    }


def test_a_next_page_of_tags_reaches_the_upstream_with_its_cursor(
    setup: tuple[FakeUpstream, httpx.Client],
) -> None:
    """Quay pages tags/list with an opaque `next_page` in its Link, not `last`: a client
    following that Link through the mirror must get the next page, not the first one again
    (a script paging through the tags looped for ever). The mirror's own `ns` stays here."""
    upstream, client = setup
    upstream.add_manifest("a", [upstream.add_blob(b"layer")])
    link = '</v2/library/x/tags/list?n=1&next_page=gAAA%3D>; rel="next"'
    upstream.answer_headers["/tags/list"] = {"Link": link}
    first = client.get("/v2/x/tags/list?n=1&ns=docker.io")
    assert first.headers["link"] == (
        '</v2/x/tags/list?n=1&next_page=gAAA%3D&ns=docker.io>; rel="next"'
    )
    client.get(first.headers["link"][1 : first.headers["link"].index(">")])
    query = upstream.queries["GET /v2/library/x/tags/list"]
    assert parse_qsl(query) == [("n", "1"), ("next_page", "gAAA=")]


def test_an_empty_n_is_not_sent_upstream(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    """`?n=` is no `n` here and to registry:2; sent on as `n=`, a stricter upstream answered
    400, which became a 503 or a stale page."""
    upstream, client = setup
    upstream.add_manifest("a", [upstream.add_blob(b"layer")])
    assert client.get("/v2/x/tags/list?n=&last=a").status_code == 200
    assert upstream.queries["GET /v2/library/x/tags/list"] == "last=a"


def test_an_absolute_next_page_link_stays_on_the_mirror(
    setup: tuple[FakeUpstream, httpx.Client],
) -> None:
    """Quay's Link is absolute, to itself: passed on as it came, a client paged on at the
    upstream (past the mirror and its credentials) under a name only the mirror knows. The
    mirror's Link is relative, as registry:2's."""
    upstream, client = setup
    upstream.add_manifest("a", [upstream.add_blob(b"layer")])
    link = f'<{upstream.url}/v2/team/app/tags/list?n=1&next_page=gAAA>; rel="next"'
    upstream.answer_headers["/tags/list"] = {"Link": link}
    page = client.get("/v2/other.example/team/app/tags/list?n=1")
    assert (
        page.headers["link"]
        == '</v2/other.example/team/app/tags/list?n=1&next_page=gAAA>; rel="next"'
    )


@pytest.mark.parametrize(
    ("link", "passed"),
    [
        # Another repository: its tags would be listed as this one's.
        ('</v2/library/other/tags/list?n=1&last=a>; rel="next"', None),
        # A path that starts with // is another host (protocol-relative): off the mirror.
        ('<{url}//evil.example/v2/library/x/tags/list?n=1>; rel="next"', None),
        # No URL at all (urlsplit: "Invalid IPv6 URL").
        ('<http://[oops/v2/library/x/tags/list?n=1>; rel="next"', None),
        # The upstream's own ns would pick another upstream for the client's next page.
        (
            '</v2/library/x/tags/list?n=1&ns=other.example&last=a>; rel="next"',
            '</v2/x/tags/list?n=1&last=a>; rel="next"',
        ),
        # Only the next page: no second link after it, to anywhere.
        (
            '</v2/library/x/tags/list?last=a>; rel="next", <http://evil.example/>; rel="next"',
            '</v2/x/tags/list?last=a>; rel="next"',
        ),
        # A link to another page than the next is nothing to page on with.
        ('</v2/library/x/tags/list?last=a>; rel="prev"', None),
    ],
)
def test_a_next_page_link_pages_this_list_through_the_mirror_only(
    setup: tuple[FakeUpstream, httpx.Client], link: str, passed: str | None
) -> None:
    """The upstream's Link is passed on only as a next page of the same list, through the
    mirror, with the client's upstream: never to another repository, host or upstream."""
    upstream, client = setup
    upstream.add_manifest("a", [upstream.add_blob(b"layer")])
    upstream.answer_headers["/tags/list"] = {"Link": link.format(url=upstream.url)}
    page = client.get("/v2/x/tags/list?n=1")
    assert page.status_code == 200
    assert page.headers.get("link") == passed


def test_the_upstreams_referrers_come_in_its_pages(
    setup: tuple[FakeUpstream, httpx.Client],
) -> None:
    """A registry that cannot list all referrers at once MUST page them with a Link (OCI
    1.1): the mirror dropped it and the cursor in it, so a client listing an image's
    signatures or SBOMs through the mirror saw the first page only."""
    upstream, client = setup
    subject = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    referrer = {"mediaType": MANIFEST_TYPE, "digest": subject, "size": 1, "artifactType": "x/y"}
    upstream.referrers[subject] = [referrer]
    link = f'</v2/library/x/referrers/{subject}?next=abc>; rel="next"'
    upstream.answer_headers[f"/referrers/{subject}"] = {"Link": link}
    first = client.get(f"/v2/x/referrers/{subject}")
    assert first.json()["manifests"] == [referrer]
    assert first.headers["link"] == f'</v2/x/referrers/{subject}?next=abc>; rel="next"'
    client.get(f"/v2/x/referrers/{subject}?next=abc")
    assert upstream.queries[f"GET /v2/library/x/referrers/{subject}"] == "next=abc"


def test_a_next_page_keeps_the_clients_ns(setup: tuple[FakeUpstream, httpx.Client]) -> None:
    """Asked with `?ns=` for another upstream than the first, a next page's Link without it
    would page through the first upstream's repository of that name: the Link keeps it,
    whether the page is the upstream's or the cache's (the upstream down)."""
    upstream, client = setup
    layer = upstream.add_blob(b"layer")
    for tag in ("a", "b"):
        upstream.add_manifest(tag, [layer])
        client.get(f"/v2/team/app/manifests/{tag}?ns=other.example")
    upstream.answer_headers["/tags/list"] = {
        "Link": '</v2/team/app/tags/list?n=1&last=a>; rel="next"'
    }
    live = client.get("/v2/team/app/tags/list?n=1&ns=other.example")
    assert (
        live.headers["link"] == '</v2/team/app/tags/list?n=1&last=a&ns=other.example>; rel="next"'
    )
    upstream.faults["/tags/list"] = 503
    cached = client.get("/v2/team/app/tags/list?n=1&ns=other.example")
    assert cached.json() == {"name": "team/app", "tags": ["a"]}
    assert (
        cached.headers["link"] == '</v2/team/app/tags/list?last=a&n=1&ns=other.example>; rel="next"'
    )


def test_tag_ttl_trusts_a_tag_without_asking(tmp_path: Path) -> None:
    with fake_upstream() as upstream:
        digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
        with (
            serve_app(mirror_of(upstream, tmp_path, tag_ttl="1h")) as url,
            httpx.Client(base_url=url) as client,
        ):
            first = client.get("/v2/a/b/manifests/v1")
            second = client.get("/v2/a/b/manifests/v1")
        assert first.headers["cache-status"] == "edgeproxy; fwd=miss"
        assert second.headers["cache-status"] == "edgeproxy; hit"
        assert second.headers["docker-content-digest"] == digest
        assert upstream.requests["HEAD /v2/a/b/manifests/v1"] == 1


def test_a_tag_whose_digest_is_cached_is_not_fetched_again(tmp_path: Path) -> None:
    """`v2` points where `v1` does (or a tag moves back): its HEAD is the only request, and
    the manifest kept in memory is counted once."""
    with fake_upstream() as upstream:
        digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
        upstream.tags["v2"] = digest
        mirror = mirror_of(upstream, tmp_path)
        with serve_app(mirror) as url, httpx.Client(base_url=url) as client:
            first = client.get("/v2/a/b/manifests/v1")
            for _ in range(3):
                again = client.get("/v2/a/b/manifests/v2")
                assert again.headers["cache-status"] == "edgeproxy; fwd=stale; fwd-status=200"
                assert again.content == first.content
        assert upstream.requests[f"GET /v2/a/b/manifests/{digest}"] == 1
        assert upstream.requests["HEAD /v2/a/b/manifests/v2"] == 3
        assert mirror.manifests._memory_bytes == len(first.content)


def test_a_cached_blob_is_served_only_where_the_upstream_has_it(tmp_path: Path) -> None:
    """Knowing a digest is not enough: through another repository the upstream is asked
    (HEAD, never a second download) before the cached bytes go out, and a repository is
    linked only when the upstream said yes (no folder for every name a client makes up)."""
    with fake_upstream() as upstream:
        layer = b"private layer" * 1000
        digest = upstream.add_blob(layer)
        upstream.faults[f"/secret/blobs/{digest}"] = 404  # only a/b has it upstream
        mirror = mirror_of(upstream, tmp_path)
        repositories = tmp_path / "docker/registry/v2/repositories"
        with serve_app(mirror) as url, httpx.Client(base_url=url) as client:
            assert client.get(f"/v2/a/b/blobs/{digest}").content == layer
            assert wait_until(lambda: mirror.storage.blob_size(digest) is not None)
            for method in ("GET", "HEAD"):
                refused = client.request(method, f"/v2/x/secret/blobs/{digest}")
                assert refused.status_code == 404
                assert refused.headers["cache-status"] == "edgeproxy; fwd=miss; fwd-status=404"
            assert refused.request.method == "HEAD"
            assert client.get(f"/v2/x/secret/blobs/{digest}").json()["errors"][0]["code"] == (
                "BLOB_UNKNOWN"
            )
            assert not (repositories / "x").exists()
            shared = client.get(f"/v2/c/d/blobs/{digest}")  # the same layer in another image
            assert shared.content == layer
            assert shared.headers["cache-status"] == "edgeproxy; fwd=stale; fwd-status=200"
            assert client.get(f"/v2/c/d/blobs/{digest}").headers["cache-status"] == HIT
        assert mirror.storage.blob_linked("c/d", digest)
        assert upstream.requests[f"HEAD /v2/c/d/blobs/{digest}"] == 1
        blob_gets = [r for r in upstream.requests if r.startswith("GET ") and "/blobs/" in r]
        assert blob_gets == [f"GET /v2/a/b/blobs/{digest}"]


def test_bearer_token_is_cached_and_renewed_once_on_401(tmp_path: Path) -> None:
    with fake_upstream() as upstream:
        upstream.tokens = set()
        digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
        with serve_app(mirror_of(upstream, tmp_path)) as url, httpx.Client(base_url=url) as client:
            for _ in range(3):
                assert client.get("/v2/a/b/manifests/v1").status_code == 200
            assert upstream.issued == 1  # one token for the scope, reused
            upstream.tokens.clear()  # the upstream forgets it (expired, revoked)
            again = client.get("/v2/a/b/manifests/v1")
            assert (again.status_code, again.headers["docker-content-digest"]) == (200, digest)
            assert upstream.issued == 2


def test_concurrent_first_requests_wait_for_the_one_probe(tmp_path: Path) -> None:
    """A fresh process's first requests, all at once: one `GET /v2/` learns the challenge and
    every blob request goes out authorized (none is refused with a 401 and sent again)."""
    with fake_upstream() as upstream:
        upstream.tokens = set()
        digests = [upstream.add_blob(bytes([n]) * 1000) for n in range(6)]
        with serve_app(mirror_of(upstream, tmp_path)) as url:

            async def fetch_all() -> list[int]:
                async with httpx.AsyncClient(base_url=url) as client:
                    answers = await asyncio.gather(
                        *(client.get(f"/v2/a/b/blobs/{d}") for d in digests)
                    )
                return [answer.status_code for answer in answers]

            assert asyncio.run(fetch_all()) == [200] * len(digests)
        assert upstream.requests["GET /v2/"] == 1
        assert [upstream.requests[f"GET /v2/a/b/blobs/{d}"] for d in digests] == [1] * 6


def test_a_list_served_as_its_amd64_manifest_is_pulled_too(tmp_path: Path) -> None:
    """A client that takes no list gets a Docker list's linux/amd64 manifest; the list (what
    the tag points to) is recorded as pulled too, or eviction by age would take the tag of an
    image pulled every day, and with it the copy served when the upstream is down."""
    with fake_upstream() as upstream:
        child = upstream.add_manifest("child", [upstream.add_blob(b"layer")])
        platform = {"os": "linux", "architecture": "amd64"}
        entry = {"mediaType": MANIFEST_TYPE, "digest": child, "size": 1, "platform": platform}
        document = {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [entry]}
        listed = upstream.add_document("v1", document)
        for pull in ("first", "again"):  # a new app each: it records a pull once a minute
            if pull == "again":
                for link in tmp_path.rglob("_manifests/revisions/sha256/*/link"):
                    os.utime(link, (1, 1))  # the first pull, long ago
            with serve_app(mirror_of(upstream, tmp_path)) as url:
                answer = httpx.get(f"{url}/v2/x/manifests/v1", headers={"Accept": MANIFEST_TYPE})
            assert answer.headers["docker-content-digest"] == child
        pulled = {m.digest: m.last_pull for m in FilesystemStorage(tmp_path).manifests()}
        assert pulled.keys() == {child, listed}
        assert all(stamp > 1 for stamp in pulled.values()), pulled

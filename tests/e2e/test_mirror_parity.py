"""Requests answered as the real registry answers them: conditions and ranges, and tags
asked for with an Accept that takes no list.

registry:2 serves a stored blob with Go's http.ServeContent (the same code in proxy mode, once
the blob is cached), so the oracle is the Debian docker-registry itself: each request goes to
it and to a warm edgeproxy, and the answers must agree.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from edgeproxy.mirror.cache_status import HIT
from edgeproxy.mirror.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_V1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
    UPSTREAM_ACCEPT,
)
from edgeproxy.mirror.protocol import MAX_HEAD
from tests.e2e.test_mirror_pull import largest_layer, upstream_entry
from tests.support.images import Image, Pushed
from tests.support.registry import Registry
from tests.support.servers import run_edgeproxy
from tests.support.skopeo import skopeo
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

DATE = "Wed, 21 Oct 2015 07:28:00 GMT"


def blob_requests(digest: str) -> list[dict[str, str]]:
    tag, other = f'"{digest}"', '"sha256:' + "0" * 64 + '"'
    # Left out where edgeproxy follows RFC 9110 and Go does not (tests/mirror/test_names.py):
    # `-0` (Go: a 206 with an impossible Content-Range), another unit or `BYTES` (Go: 416),
    # `+1-2` (Go: 206) and numbers past int64 (Go: 416).
    return [
        {},
        {"If-None-Match": tag},
        {"If-None-Match": f"W/{tag}"},
        {"If-None-Match": "*"},
        {"If-None-Match": other},
        {"If-None-Match": f"{other}, {tag}"},
        {"If-Match": tag},
        {"If-Match": "*"},
        {"If-Match": other},
        {"If-Match": f"W/{tag}"},
        {"If-Match": other, "If-None-Match": tag},
        {"Range": "bytes=10-19"},
        {"Range": "bytes=-5"},
        {"Range": "bytes=10-19", "If-Range": tag},
        {"Range": "bytes=10-19", "If-Range": other},
        {"Range": "bytes=10-19", "If-Range": f"W/{tag}"},
        {"Range": "bytes=10-19", "If-Range": DATE},
        {"Range": "bytes=10-19", "If-None-Match": tag},
        {"Range": "bytes=10-19", "If-Match": other},
        {"Range": "bytes=10-19,30-39"},
        {"Range": "bytes=0-4, 3-8,\t-3"},
        {"Range": "bytes=10-19,999999999-"},
        {"Range": "bytes=,10-19,"},
        {"Range": "bytes= 10 - 19"},
        {"Range": "bytes=0-,0-"},
        {"Range": "bytes="},
        {"Range": "bytes=10-19,30-39", "If-Range": other},
        {"Range": "bytes=999999999-"},
        {"Range": "bytes=999999998-,999999999-"},
        {"Range": "bytes=19-10"},
        {"Range": "bytes=abc"},
        {"Range": "bytes=-"},
        {"Range": "bytes=1-2-3"},
        {"Range": "bytes=0x1-2"},
    ]


Answer = tuple[int, str | None, str | None, str | None, str | None, bytes | None]
GONE = (None, None, None)  # no type, length or body to compare


def answer(client: httpx.Client, method: str, url: str, headers: dict[str, str]) -> Answer:
    """What must agree: the status, the range sent, the ETag, and the body with its type and
    length. registry:2's 412 and 416 keep the blob's Content-Length and send a shorter body
    or none (Go then closes the connection): only a 200's or a 206's are compared. The random
    boundary of a multipart/byteranges body is set aside."""
    with client.stream(method, url, headers=headers) as response:
        if response.status_code not in (200, 206):
            etag = response.headers.get("etag")
            return response.status_code, response.headers.get("content-range"), etag, *GONE
        kind = response.headers["content-type"]
        body = response.read()
        boundary = kind.partition("boundary=")[2]
        if boundary:
            kind, body = kind.replace(boundary, "B"), body.replace(boundary.encode(), b"B")
        return (
            response.status_code,
            response.headers.get("content-range"),
            response.headers.get("etag"),
            kind,
            response.headers.get("content-length"),
            body,
        )


def test_blob_conditions_and_ranges_as_registry2(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    item = push_all(registry_none)["multi"]
    digest, blob = largest_layer(item)
    path = f"/v2/{item.repo}/blobs/{digest}"
    with (
        run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror,
        httpx.Client(timeout=60) as client,
    ):
        # Cold, a HEAD is answered from the upstream's HEAD (the blob is not fetched) ...
        gets = registry_none.count("GET", f"/blobs/{digest}")  # the registry is the session's
        for headers in blob_requests(digest):
            expected = answer(client, "HEAD", registry_none.url + path, headers)
            assert answer(client, "HEAD", mirror.url + path, headers) == expected, headers
        assert registry_none.count("GET", f"/blobs/{digest}") == gets
        # ... warm, from the cache.
        assert client.get(mirror.url + path).content == blob
        # The fill commits just after its clients had the last byte.
        assert wait_until(lambda: client.head(mirror.url + path).headers.get("cache-status") == HIT)
        for method in ("GET", "HEAD"):
            for headers in blob_requests(digest):
                expected = answer(client, method, registry_none.url + path, headers)
                assert answer(client, method, mirror.url + path, headers) == expected, (
                    method,
                    headers,
                )


def test_manifest_not_modified_as_registry2(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    """registry:2 takes If-None-Match quoted or bare for manifests, not `*`; edgeproxy too."""
    item = push_all(registry_none)["small"]
    digest = item.image.manifest_digest
    path = f"/v2/{item.repo}/manifests/{digest}"
    with (
        run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror,
        httpx.Client(timeout=60) as client,
    ):
        for value in (f'"{digest}"', digest):
            for base in (registry_none.url, mirror.url):
                headers = {"If-None-Match": value, "Accept": OCI_MANIFEST}
                response = client.get(base + path, headers=headers)
                assert response.status_code == 304, (base, value)
                assert response.content == b""
        # `*` is no digest to registry:2: the manifest comes (blob_requests: a blob's 304).
        for base in (registry_none.url, mirror.url):
            star = client.get(base + path, headers={"If-None-Match": "*", "Accept": OCI_MANIFEST})
            assert star.status_code == 200, base


def test_methods_and_other_digests_as_registry2(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    """The status and Allow registry:2 answers for methods its routes do not take (the
    mirror's 405 body is the registry's JSON, not Go's text), and for a sha512 digest."""
    item = push_all(registry_none)["small"]
    sha512 = "sha512:" + "a" * 128
    requests = [
        ("HEAD", f"/v2/{item.repo}/tags/list"),
        ("OPTIONS", f"/v2/{item.repo}/tags/list"),
        ("DELETE", f"/v2/{item.repo}/tags/list"),
        ("HEAD", "/v2/_catalog"),
        ("OPTIONS", "/v2/_catalog"),
        ("POST", "/v2/_catalog"),
        ("HEAD", "/v2/"),
        ("POST", "/v2/"),
        ("DELETE", "/v2/"),
        ("GET", f"/v2/{item.repo}/blobs/{sha512}"),
        ("HEAD", f"/v2/{item.repo}/blobs/{sha512}"),
        ("GET", f"/v2/{item.repo}/manifests/{sha512}"),
    ]
    with (
        run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror,
        httpx.Client(timeout=60) as client,
    ):
        for method, path in requests:
            answers = [
                client.request(method, base + path) for base in (registry_none.url, mirror.url)
            ]
            expected, got = ((a.status_code, a.headers.get("allow")) for a in answers)
            assert got == expected, (method, path)
            if method == "GET":
                codes = [a.json()["errors"][0]["code"] for a in answers]
                assert codes[0] == codes[1], (method, path)


def test_paths_off_by_a_slash_as_registry2(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    """registry:2's router moves a path that names a route but for its last slash (301, the
    query kept), for any method; a path that is no route with or without it is not moved.
    (An upload's path is moved there too; the mirror knows no upload routes: a 404.)"""
    item = push_all(registry_none)["small"]
    digest, _ = largest_layer(item)
    paths = [
        "/v2",
        "/v2?last=a&n=%31",
        f"/v2/{item.repo}/manifests/{item.tag}/",
        f"/v2/{item.repo}/manifests/{item.image.manifest_digest}/?ns=docker.io",
        f"/v2/{item.repo}/blobs/{digest}/",
        f"/v2/{item.repo}/tags/list/?n=1",
        "/v2/_catalog/",
        f"/v2/{item.repo}/",
    ]
    with (
        run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror,
        httpx.Client(timeout=60) as client,
    ):
        for path in paths:
            for method in ("GET", "HEAD", "DELETE"):
                answers = [
                    client.request(method, base + path) for base in (registry_none.url, mirror.url)
                ]
                expected, got = ((a.status_code, a.headers.get("location")) for a in answers)
                if expected[0] == 301:
                    assert got == expected, (method, path)
                    if method == "GET":
                        assert answers[1].text == answers[0].text, path
                else:
                    assert got[0] != 301, (method, path)


def head_status(url: str, size: int) -> bytes:
    """The status a request head of `size` bytes gets, b"reset" for a connection reset."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    start = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: "
    with socket.create_connection((host, port), timeout=30) as client:
        try:
            client.sendall(start + b"a" * (size - len(start) - 4) + b"\r\n\r\n")
            return client.recv(12)[9:12]
        except ConnectionResetError:  # Go closes with bytes of the head unread
            return b"reset"


def test_a_request_head_up_to_the_bytes_go_takes(registry_none: Registry, tmp_path: Path) -> None:
    """registry:2 (Go's net/http) reads a request head of up to 1 MiB + 4096 bytes, and answers
    one longer 431; the mirror listener takes the same bytes."""
    with run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror:
        for url in (registry_none.url, mirror.url):
            assert head_status(url, MAX_HEAD) == b"200", url
        assert head_status(registry_none.url, MAX_HEAD + 1) in (b"431", b"reset")
        assert head_status(mirror.url, MAX_HEAD + 1) == b"431"


ACCEPTS = [
    None,
    "*/*",
    "application/json",
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_LIST,
    f"{OCI_MANIFEST}, {OCI_INDEX}",
    f"{DOCKER_LIST}, {DOCKER_MANIFEST}",
    f"{OCI_INDEX}; q=0, {DOCKER_MANIFEST}",
    OCI_MANIFEST.upper(),
]


def manifest_answer(client: httpx.Client, method: str, url: str, accept: str | None) -> Answer:
    """A manifest's status, type, digest, length and body, or its error code."""
    headers = {} if accept is None else {"Accept": accept}
    response = client.request(method, url, headers=headers)
    if response.status_code != 200:
        code = response.json()["errors"][0]["code"] if method == "GET" else None
        return response.status_code, code, *GONE, None
    return (
        200,
        response.headers["content-type"],
        response.headers["docker-content-digest"],
        response.headers.get("content-length"),
        response.headers["etag"],
        response.content,
    )


def test_manifests_for_each_accept_as_registry2(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    test_images: dict[str, Image],
    tmp_path: Path,
) -> None:
    """registry:2 meets a client's Accept itself (the same code in proxy mode): an OCI
    manifest or index only to a client that names its type, a Docker list's linux/amd64
    manifest to one that takes no list (by tag). The mirror asks its upstream for every type
    and answers each client the same way, by tag and by digest, cold and warm. Where
    registry:2 2.8 rewrites schema 2 to schema 1 for a client that takes no schema 2, the
    mirror serves schema 2 (as distribution 3 does)."""
    pushed = push_all(registry_none)
    images = {"oci": pushed["small"].repo, "oci-index": pushed["multiarch"].repo}
    for name, source in (
        ("docker", test_images["small"]),
        ("docker-list", test_images["multiarch"]),
    ):
        images[name] = f"test/{name}"
        skopeo(
            "copy", "--all", "--format", "v2s2", "--dest-tls-verify=false", "--dest-no-creds",
            f"oci:{source.layout}:{source.tag}", f"docker://{registry_none.host}/{images[name]}:v1",
        )  # fmt: skip
    with (
        run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror,
        httpx.Client(timeout=60) as client,
    ):
        del client.headers["accept"]  # httpx sends */* unless told not to
        for repo in images.values():
            top = client.get(
                f"{registry_none.url}/v2/{repo}/manifests/v1", headers={"Accept": UPSTREAM_ACCEPT}
            )
            for reference in ("v1", top.headers["docker-content-digest"]):
                path = f"/v2/{repo}/manifests/{reference}"
                for accept in ACCEPTS:
                    for method in ("GET", "HEAD"):
                        expected = manifest_answer(client, method, registry_none.url + path, accept)
                        got = manifest_answer(client, method, mirror.url + path, accept)
                        if expected[1] == DOCKER_V1_SIGNED:
                            assert got[1] == DOCKER_MANIFEST, (path, accept)
                            continue
                        assert got == expected, (path, accept, method)


def test_a_narrow_accept_never_changes_the_tag_for_others(
    registry_none: Registry, test_images: dict[str, Image], tmp_path: Path
) -> None:
    """registry:2 answers a tag of a Docker manifest list, to a client that takes no list,
    with the linux/amd64 manifest. The mirror passes that answer on, but keeps the tag: a
    client that takes lists still gets the list, from the cache while `tag_ttl` lasts."""
    index = test_images["multiarch"]
    repo = "test/docker-list"
    skopeo(
        "copy", "--all", "--format", "v2s2", "--dest-tls-verify=false", "--dest-no-creds",
        f"oci:{index.layout}:{index.tag}", f"docker://{registry_none.host}/{repo}:v1",
    )  # fmt: skip
    path = f"/v2/{repo}/manifests/v1"
    narrow = {"Accept": DOCKER_MANIFEST}
    full = {"Accept": f"{DOCKER_LIST}, {DOCKER_MANIFEST}"}
    entry = {**upstream_entry(registry_none), "tag_ttl": "1h"}
    with run_edgeproxy(tmp_path, [entry]) as mirror, httpx.Client(timeout=60) as client:
        for headers in (narrow, full, full):
            expected = client.get(registry_none.url + path, headers=headers)
            response = client.get(mirror.url + path, headers=headers)
            assert response.status_code == expected.status_code == 200
            assert response.headers["content-type"] == expected.headers["content-type"]
            assert response.content == expected.content
        assert expected.headers["content-type"] == DOCKER_LIST
        assert response.headers["cache-status"] == HIT


def test_a_cached_blob_through_a_repository_without_it(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    """registry:2 answers 404 for a blob asked through a repository that does not have it;
    the mirror too, though it has the bytes (cached through another repository)."""
    item = push_all(registry_none)["small"]
    digest = item.image.layer_digests[0]
    with (
        run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror,
        httpx.Client(timeout=60) as client,
    ):
        assert client.get(f"{mirror.url}/v2/{item.repo}/blobs/{digest}").status_code == 200
        for base in (registry_none.url, mirror.url):
            answer = client.get(f"{base}/v2/test/elsewhere/blobs/{digest}")
            assert answer.status_code == 404, base
            assert answer.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_paging_parameters_as_registry2(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    """An empty `n` (a script's unset page size) is no `n` to registry:2, 2.8 and 3 alike:
    the default page, not a 400."""
    item = push_all(registry_none)["small"]
    with (
        run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror,
        httpx.Client(timeout=60) as client,
    ):
        for path in ("/v2/_catalog", f"/v2/{item.repo}/tags/list"):
            for query in ("?n=", "?n=&last=a", "?n=0", "?n=1001", "?last=zzz"):
                expected = client.get(registry_none.url + path + query).status_code
                got = client.get(mirror.url + path + query).status_code
                assert got == expected, (path, query)

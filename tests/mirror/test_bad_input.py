"""Hostile input from clients and upstreams: each gets a clear registry JSON error, nothing
lands in the cache that should not, and the server keeps serving."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeproxy.mirror.app import MirrorApp
from tests.mirror.fake_upstream import MANIFEST_TYPE, FakeUpstream, digest_of, fake_upstream
from tests.mirror.fake_upstream import mirror_of as fake_mirror
from tests.support.rawhttp import Answer, exchange
from tests.support.servers import serve_app
from tests.support.verify import verify_cache

SHA = "sha256:" + "a" * 64


class Mirror:
    def __init__(self, app: MirrorApp, url: str) -> None:
        self.app = app
        self.port = int(url.rsplit(":", 1)[1])
        self.client = httpx.Client(base_url=url, timeout=30)

    def raw(self, target: bytes, headers: bytes = b"") -> Answer:
        """GET `target` exactly as written: httpx would normalise `..` and escapes."""
        head = b"GET " + target + b" HTTP/1.1\r\nHost: mirror\r\n" + headers
        return exchange(self.port, head + b"Connection: close\r\n\r\n")

    def still_serving(self) -> bool:
        return self.client.get("/v2/").status_code == 200


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with fake_upstream() as fake:
        yield fake


@pytest.fixture
def mirror(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Mirror]:
    app = fake_mirror(upstream, tmp_path / "cache")
    with serve_app(app) as url:
        mirror = Mirror(app, url)
        yield mirror
        mirror.client.close()
    assert verify_cache(app.config.root).corrupt == []


def error_of(answer: Answer) -> tuple[int, str]:
    assert answer.header("content-type") == "application/json"
    errors = json.loads(answer.body)["errors"]
    return answer.status, errors[0]["code"]


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        (b"/v2/../etc/manifests/latest", 400, "NAME_INVALID"),
        (b"/v2/%2e%2e/etc/manifests/latest", 400, "NAME_INVALID"),
        (b"/v2/x/%2E%2E/%2e%2e/blobs/" + SHA.encode(), 400, "NAME_INVALID"),
        (b"/v2//etc/passwd/manifests/latest", 400, "NAME_INVALID"),
        (b"/v2/%2Fetc/manifests/latest", 400, "NAME_INVALID"),
        (b"/v2/a%00b/manifests/latest", 400, "NAME_INVALID"),
        (b"/v2/" + b"a" * 256 + b"/manifests/latest", 400, "NAME_INVALID"),
        (b"/v2/" + b"a/" * 128 + b"a/tags/list", 400, "NAME_INVALID"),
        (b"/v2/Library/Alpine/manifests/latest", 400, "NAME_INVALID"),
        (b"/v2/x%0d%0aSet-Cookie:%20a=b/manifests/latest", 400, "NAME_INVALID"),
        (b"/v2/x/manifests/..", 400, "TAG_INVALID"),
        (b"/v2/x/manifests/%2e%2e", 400, "TAG_INVALID"),
        (b"/v2/x/manifests/a%00b", 400, "TAG_INVALID"),
        (b"/v2/x/manifests/a%0d%0aX-Evil", 400, "TAG_INVALID"),
        (b"/v2/x/manifests/" + b"t" * 129, 400, "TAG_INVALID"),
        (b"/v2/x/manifests/.hidden", 400, "TAG_INVALID"),
        (b"/v2/x/blobs/sha256:zz", 400, "DIGEST_INVALID"),
        (b"/v2/x/blobs/sha256:" + b"A" * 64, 400, "DIGEST_INVALID"),
        (b"/v2/x/blobs/sha256:" + b"a" * 63, 400, "DIGEST_INVALID"),
        (b"/v2/x/blobs/md5:" + b"a" * 32, 400, "DIGEST_INVALID"),
        # The OCI image spec: sha256 SHOULD be supported, sha512 MAY. The cache holds sha256
        # content only: a well-formed sha512 is unknown, as registry:2 answers what it lacks.
        (b"/v2/x/blobs/sha512:" + b"a" * 127, 400, "DIGEST_INVALID"),
        (b"/v2/x/blobs/sha512:" + b"a" * 128, 404, "BLOB_UNKNOWN"),
        (b"/v2/x/manifests/sha512:" + b"a" * 128, 404, "MANIFEST_UNKNOWN"),
        (b"/v2/x/blobs/sha256:..%2f..%2f..%2fetc", 404, "UNSUPPORTED"),
        (b"/v2/x/referrers/latest", 400, "DIGEST_INVALID"),
        (b"/v2/_catalog?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),
        (b"/v2/_catalog?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
        (b"/v2/x/tags/list?n=1e9", 400, "PAGINATION_NUMBER_INVALID"),
        (b"/v2/x/manifests/latest?ns=unknown.example", 404, "NAME_UNKNOWN"),
        (b"/v2/x/manifests/latest?ns=127.0.0.1:1", 404, "NAME_UNKNOWN"),
        (b"/v2/x/manifests/latest?ns=a%0d%0aX-Evil:%201", 404, "NAME_UNKNOWN"),
        (b"/v2/x/manifests/latest?ns=%C4%80", 404, "NAME_UNKNOWN"),
        (b"/v3/x/manifests/latest", 404, "UNSUPPORTED"),
    ],
)
def test_bad_request_paths(mirror: Mirror, target: bytes, status: int, code: str) -> None:
    answer = mirror.raw(target)
    assert error_of(answer) == (status, code)
    # Nothing the client sent comes back as a header of its own.
    assert answer.header("x-evil") is None and answer.header("set-cookie") is None
    assert answer.header("oci-namespace") is None
    assert mirror.still_serving()
    assert not (mirror.app.config.root.parent / "etc").exists()


def test_huge_numbers_are_not_a_crash(mirror: Mirror, upstream: FakeUpstream) -> None:
    """Python's int() refuses over 4300 digits; a Range or an `n` that long is just large."""
    digest = upstream.add_blob(b"0123456789")
    assert mirror.client.get(f"/v2/x/blobs/{digest}").content == b"0123456789"
    huge = "9" * 5000
    past = mirror.client.get(f"/v2/x/blobs/{digest}", headers={"Range": f"bytes={huge}-"})
    assert past.status_code == 416
    assert past.headers["content-range"] == "bytes */10"
    whole = mirror.client.get(f"/v2/x/blobs/{digest}", headers={"Range": f"bytes=2-{huge}"})
    assert (whole.status_code, whole.content) == (206, b"23456789")
    suffix = mirror.client.get(f"/v2/x/blobs/{digest}", headers={"Range": f"bytes=-{huge}"})
    assert (suffix.status_code, suffix.content) == (206, b"0123456789")
    assert mirror.client.get(f"/v2/_catalog?n={huge}").status_code == 400  # over 1000
    assert mirror.still_serving()


@pytest.mark.parametrize("warm", [False, True])
def test_ranges(mirror: Mirror, upstream: FakeUpstream, warm: bool) -> None:
    blob = os.urandom(100_000)
    digest = upstream.add_blob(blob)
    path = f"/v2/x/blobs/{digest}"
    if warm:
        assert mirror.client.get(path).content == blob
    past = mirror.client.get(path, headers={"Range": "bytes=100000-"})
    assert past.status_code == 416
    assert past.json()["errors"][0]["code"] == "RANGE_INVALID"
    assert past.headers["content-range"] == "bytes */100000"
    several = mirror.client.get(path, headers={"Range": "bytes=90000-,0-9,-5"})
    assert several.status_code == 206
    assert "content-range" not in several.headers
    assert int(several.headers["content-length"]) == len(several.content)
    assert byteranges(several) == [
        ("bytes 90000-99999/100000", blob[90000:]),
        ("bytes 0-9/100000", blob[:10]),
        ("bytes 99995-99999/100000", blob[-5:]),
    ]
    for header in ("bytes=5-1", "bytes=abc", "bytes=-", "bytes=1-2-3"):
        invalid = mirror.client.get(path, headers={"Range": header})
        assert invalid.status_code == 416, header
        assert invalid.headers["etag"] == f'"{digest}"'
    for header in ("lines=0-9", "bytes=0-,0-"):  # another unit; more than the whole blob
        ignored = mirror.client.get(path, headers={"Range": header})
        assert (ignored.status_code, ignored.content) == (200, blob), header
    assert mirror.still_serving()


def byteranges(response: httpx.Response) -> list[tuple[str, bytes]]:
    """The Content-Range and bytes of each part of a multipart/byteranges answer."""
    kind, _, boundary = response.headers["content-type"].partition("; boundary=")
    assert kind == "multipart/byteranges"
    *parts, end = response.content.split(b"--" + boundary.encode())
    assert (parts[0], end) == (b"", b"--\r\n")
    found = []
    for part in parts[1:]:
        head, _, data = part.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        assert fields["Content-Type"] == "application/octet-stream"
        found.append((fields["Content-Range"], data.removesuffix(b"\r\n")))
    return found


def test_accept_with_bytes_an_upstream_cannot_take(mirror: Mirror, upstream: FakeUpstream) -> None:
    digest = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    answer = mirror.raw(
        b"/v2/x/manifests/v1", b"Accept: \xc4\x80/x\r\nAccept: " + MANIFEST_TYPE.encode() + b"\r\n"
    )
    assert answer.status == 200
    assert answer.header("docker-content-digest") == digest


def serve_manifest(upstream: FakeUpstream, tag: str, data: bytes) -> str:
    """Let the upstream answer `tag` with `data` as they are; the digest they have."""
    digest = digest_of(data)
    upstream.manifests[digest] = data
    upstream.tags[tag] = digest
    return digest


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"not json at all", 400, "MANIFEST_INVALID"),
        (b"[1, 2, 3]", 400, "MANIFEST_INVALID"),
        (b'{"mediaType": "a/b\\r\\nSet-Cookie: x=y", "schemaVersion": 2}', 400, "MANIFEST_INVALID"),
        (b'{"mediaType": "\\u0100/x", "schemaVersion": 2}', 400, "MANIFEST_INVALID"),
        # registry:2 refuses manifests over 4 MiB; so does the mirror, from its upstream.
        (b'{"pad": "' + b"x" * (4 * 1024 * 1024) + b'"}', 503, "UNAVAILABLE"),
    ],
)
def test_bad_manifests_from_upstream_are_refused_and_not_cached(
    mirror: Mirror, upstream: FakeUpstream, data: bytes, status: int, code: str
) -> None:
    digest = serve_manifest(upstream, "bad", data)
    for reference in ("bad", digest):
        response = mirror.client.get(f"/v2/x/manifests/{reference}")
        assert response.status_code == status
        assert response.json()["errors"][0]["code"] == code
        assert "set-cookie" not in response.headers
    assert mirror.app.storage.read_manifest("x", digest) is None
    assert mirror.app.storage.read_tag("x", "bad") is None
    assert mirror.app.storage.blob_size(digest) is None
    assert mirror.still_serving()


def test_manifest_not_matching_the_digest_upstream_claims(
    mirror: Mirror, upstream: FakeUpstream
) -> None:
    good = upstream.add_manifest("v1", [upstream.add_blob(b"layer")])
    upstream.manifests[good] = upstream.manifests[good].replace(b"layer", b"LAYER")
    response = mirror.client.get("/v2/x/manifests/v1")  # the upstream's header names `good`
    assert response.status_code == 503
    assert "do not match" in response.json()["errors"][0]["message"]
    assert mirror.app.storage.read_tag("x", "v1") is None
    assert mirror.app.storage.read_manifest("x", good) is None
    assert mirror.still_serving()

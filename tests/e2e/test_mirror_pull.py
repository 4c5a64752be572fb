"""Pulls through edgeproxy from the real registry (Debian docker-registry 2.8) with skopeo
and podman: cold, warm, concurrent, ranged, with the upstream stopped, in three auth modes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy.mirror.cache_status import STALE
from edgeproxy.mirror.manifests import OCI_INDEX, OCI_MANIFEST
from tests.support.edge import make_certificate
from tests.support.images import Pushed, build_image, push, random_layer
from tests.support.podman import mirror_env
from tests.support.registry import Registry, start_registry
from tests.support.servers import EdgeproxyProcess, run_edgeproxy
from tests.support.skopeo import skopeo, skopeo_inspect_raw
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


def upstream_entry(registry: Registry, name: str = "docker.io") -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "url": registry.url}
    if registry.creds:
        entry["username"], entry["password"] = registry.creds
    return entry


def pull(mirror: EdgeproxyProcess, repo: str, destination: Path) -> None:
    """`skopeo copy --all` from the mirror into an OCI layout."""
    skopeo(
        "copy", "--all", "--src-tls-verify=false", "--src-no-creds", "--preserve-digests",
        f"docker://{mirror.host}/{repo}", f"oci:{destination}:v1",
    )  # fmt: skip


def pulled_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


def blob_gets(registry: Registry, digests: list[str]) -> int:
    return sum(registry.count("GET", f"/blobs/{d}") for d in digests)


def layer_gets_report(registry: Registry, pushed: dict[str, Pushed], mirror_log: str) -> str:
    """What to look at when a layer was fetched more than once: the upstream's GETs of the
    layers (status, client, time) and the end of the mirror's log."""
    layers = {d for p in pushed.values() for d in p.image.layer_digests}
    gets = [
        f"{e.time} {e.status} {e.remote} {e.user_agent} {e.path.rsplit('/', 1)[-1][:19]}"
        for e in registry.access_log()
        if e.method == "GET" and e.path.rsplit("/", 1)[-1] in layers
    ]
    return "\n".join(["upstream layer GETs:", *gets, "mirror log:", *mirror_log.splitlines()[-40:]])


def largest_layer(item: Pushed) -> tuple[str, bytes]:
    digest = max(item.image.layer_digests, key=lambda d: item.image.blob_path(d).stat().st_size)
    return digest, item.image.blob_path(digest).read_bytes()


@pytest.mark.parametrize("mode", ["none", "htpasswd", "token"])
def test_skopeo_pulls_cold_then_warm(
    mode: str,
    request: pytest.FixtureRequest,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    registry: Registry = request.getfixturevalue(f"registry_{mode}")
    pushed = push_all(registry)
    tokens_before = registry.token_server.token_requests if registry.token_server else 0
    with run_edgeproxy(tmp_path, [upstream_entry(registry)]) as mirror:
        for rounds in ("cold", "warm"):
            before = {
                name: blob_gets(registry, p.image.layer_digests) for name, p in pushed.items()
            }
            for name, item in pushed.items():
                destination = tmp_path / f"{rounds}-{name}"
                pull(mirror, f"{item.repo}:{item.tag}", destination)
                assert pulled_digest(destination) == item.image.manifest_digest
                raw = skopeo_inspect_raw(f"docker://{mirror.host}/{item.repo}:{item.tag}")
                assert "sha256:" + hashlib.sha256(raw).hexdigest() == item.image.manifest_digest
            after = {name: blob_gets(registry, p.image.layer_digests) for name, p in pushed.items()}
            fetched = {name: after[name] - before[name] for name in pushed}
            if rounds == "cold":  # every layer of every platform, each exactly once
                expected = {n: len(p.image.layer_digests) for n, p in pushed.items()}
                assert fetched == expected, layer_gets_report(registry, pushed, mirror.log())
            else:
                assert fetched == dict.fromkeys(pushed, 0)
        if registry.token_server is not None:  # tokens are cached, not fetched per request
            # One per repository per worker, whichever workers the pulls reach (the token
            # server is the session's: count from the start of this test's pulls).
            asked = registry.token_server.requests[tokens_before:]
            assert len(asked) <= len(pushed) * (os.cpu_count() or 1), asked
            assert all(scope.endswith(":pull") for r in asked for scope in r.scopes)


def test_concurrent_cold_fetches_hit_the_upstream_once(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    item = push_all(registry_none)["multi"]
    digest, expected = largest_layer(item)
    before = registry_none.count("GET", f"/blobs/{digest}")
    with run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror:
        url = f"{mirror.url}/v2/{item.repo}/blobs/{digest}"

        def fetch(_: int) -> bytes:
            return httpx.get(url, timeout=60).content

        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(fetch, range(8)))
    assert all(body == expected for body in bodies)
    assert registry_none.wait_count("GET", f"/blobs/{digest}", before + 1) == before + 1


def test_ranges_on_cold_and_warm_blobs(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    item = push_all(registry_none)["multi"]
    digest, blob = largest_layer(item)
    with run_edgeproxy(tmp_path, [upstream_entry(registry_none)]) as mirror:
        url = f"{mirror.url}/v2/{item.repo}/blobs/{digest}"
        for state in ("edgeproxy; fwd=miss", "edgeproxy; hit"):
            response = httpx.get(url, headers={"Range": "bytes=1000-2999999"}, timeout=60)
            assert response.status_code == 206
            assert response.headers["cache-status"] == state
            assert response.headers["content-range"] == f"bytes 1000-2999999/{len(blob)}"
            assert response.content == blob[1000:3000000]
            if state.endswith("miss"):  # let the fill finish before the warm round
                assert httpx.get(url, timeout=60).content == blob
                data = tmp_path / "cache/docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:]
                assert wait_until((data / "data").exists)
        past = httpx.get(url, headers={"Range": f"bytes={len(blob)}-"})
        assert past.status_code == 416
        assert past.headers["content-range"] == f"bytes */{len(blob)}"


def test_cache_serves_with_the_upstream_stopped(
    push_all: Callable[[Registry], dict[str, Pushed]], tmp_path: Path
) -> None:
    upstream = start_registry(tmp_path / "upstream")
    try:
        pushed = push_all(upstream)
        with run_edgeproxy(tmp_path / "mirror", [upstream_entry(upstream)]) as mirror:
            small = pushed["small"]
            pull(mirror, f"{small.repo}:v1", tmp_path / "warm")
            upstream.stop()
            pull(mirror, f"{small.repo}:v1", tmp_path / "by-tag")  # served stale
            pull(mirror, f"{small.repo}@{small.image.manifest_digest}", tmp_path / "by-digest")
            assert pulled_digest(tmp_path / "by-tag") == small.image.manifest_digest
            oci = {"Accept": OCI_MANIFEST}
            response = httpx.get(f"{mirror.url}/v2/{small.repo}/manifests/v1", headers=oci)
            assert response.headers["cache-status"] == "edgeproxy; hit; detail=stale"
            uncached = httpx.get(f"{mirror.url}/v2/test/multi/manifests/v1", headers=oci)
            assert uncached.status_code == 503
            assert uncached.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert "unavailable" in uncached.json()["errors"][0]["message"]
    finally:
        upstream.close()


def test_an_ipv6_upstream(
    push_all: Callable[[Registry], dict[str, Pushed]], tmp_path: Path
) -> None:
    """`url = "http://[::1]:PORT"`: both upstream clients (httpx for manifests, http.client for
    blobs) reach it. The images are pushed over IPv4 to a registry sharing its storage: skopeo
    takes no IPv6 address in an image reference."""
    pusher = start_registry(tmp_path / "pusher")
    v6 = None
    try:
        small = push_all(pusher)["small"]
        v6 = start_registry(tmp_path / "v6", address="::1", storage=pusher.root)
        assert v6.url.startswith("http://[::1]:")
        with run_edgeproxy(tmp_path / "mirror", [upstream_entry(v6)]) as mirror:
            pull(mirror, f"{small.repo}:v1", tmp_path / "pulled")
        assert pulled_digest(tmp_path / "pulled") == small.image.manifest_digest
        for digest in small.image.layer_digests:
            assert v6.wait_count("GET", f"/blobs/{digest}", 1) == 1
    finally:
        if v6 is not None:
            v6.close()
        pusher.close()


def test_serves_a_cache_filled_by_registry2(
    push_all: Callable[[Registry], dict[str, Pushed]], tmp_path: Path
) -> None:
    """A /var/lib/registry left by a registry:2 mirror is served warm with no upstream."""
    upstream = start_registry(tmp_path / "upstream")
    baseline = start_registry(tmp_path / "baseline", remote=upstream.url)
    try:
        small = push_all(upstream)["small"]
        skopeo(
            "copy", "--src-tls-verify=false", "--src-no-creds",
            f"docker://{baseline.host}/{small.repo}:v1", f"oci:{tmp_path / 'via-baseline'}:v1",
        )  # fmt: skip
        # registry:2 stores cold blobs in the background, after the client has them.
        blobs = [baseline.root / "docker/registry/v2/blobs/sha256" / d[7:9] / d[7:] / "data"
                 for d in [*small.image.layer_digests, str(small.image.config_digest)]]  # fmt: skip
        assert wait_until(lambda: all(b.exists() for b in blobs), timeout=60)
        baseline.stop()
        upstream.stop()
        with run_edgeproxy(
            tmp_path / "edgeproxy", [upstream_entry(upstream)], root=str(baseline.root)
        ) as mirror:
            pull(mirror, f"{small.repo}:v1", tmp_path / "via-edgeproxy")
        assert pulled_digest(tmp_path / "via-edgeproxy") == small.image.manifest_digest
    finally:
        baseline.close()
        upstream.close()


def test_https_upstream_trusted_through_its_ca(tmp_path: Path) -> None:
    """A private upstream over https (a real registry with http.tls): trusted through the
    upstream's `ca`, skopeo pulls cold then warm, each layer fetched once; without `ca` (certifi
    and the system's store) manifests and blobs get a clear 503 UNAVAILABLE, never a 500; a CA
    in the system's store (its file or its folder: SSL_CERT_FILE, SSL_CERT_DIR here) is
    trusted without `ca`."""
    certificate, key = make_certificate(tmp_path / "tls", "127.0.0.1")
    upstream = start_registry(tmp_path / "upstream", tls=(certificate, key))
    try:
        image = build_image(
            tmp_path / "image",
            "v1",
            [random_layer(3_000_000, seed=50), random_layer(200_000, seed=51)],
        )
        push(image, upstream, "test/tls", "v1")
        entry = upstream_entry(upstream)
        with run_edgeproxy(tmp_path / "untrusted", [entry]) as mirror:
            for path in ("manifests/v1", f"blobs/{image.layer_digests[0]}"):
                response = httpx.get(f"{mirror.url}/v2/test/tls/{path}", timeout=30)
                assert response.status_code == 503, response.text
                assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
        with run_edgeproxy(tmp_path / "trusted", [{**entry, "ca": str(certificate)}]) as mirror:
            for attempt in ("cold", "warm"):
                pull(mirror, "test/tls:v1", tmp_path / attempt)
                assert pulled_digest(tmp_path / attempt) == image.manifest_digest
        assert blob_gets(upstream, image.layer_digests) == len(image.layer_digests)
        # The system's store, as registry:2 trusts it: a CA installed there needs no `ca`.
        folder = tmp_path / "certs"
        folder.mkdir()
        shutil.copy(certificate, folder / "company.pem")
        subprocess.run(["openssl", "rehash", str(folder)], check=True)  # update-ca-certificates'
        for variable, system in (("SSL_CERT_FILE", certificate), ("SSL_CERT_DIR", folder)):
            env = {variable: str(system)}
            with run_edgeproxy(tmp_path / variable, [entry], env=env) as mirror:
                pull(mirror, "test/tls:v1", tmp_path / f"{variable}-pull")
                assert pulled_digest(tmp_path / f"{variable}-pull") == image.manifest_digest
    finally:
        upstream.close()


def test_podman_pulls_through_the_mirror(
    registry_none: Registry, tmp_path: Path, podman: list[str]
) -> None:
    image = build_image(tmp_path / "image", "v1", [random_layer(300_000, seed=42)])
    push(image, registry_none, "test/podman", "v1")
    with run_edgeproxy(tmp_path / "mirror", [upstream_entry(registry_none)]) as mirror:
        env = mirror_env(tmp_path / "registries.conf", mirror.host, insecure=True)
        result = subprocess.run(
            [*podman, "pull", "docker.io/test/podman:v1"],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        images = subprocess.run(
            [*podman, "images", "--digests", "--format", "{{.Digest}}"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert image.manifest_digest in images.stdout
        assert f'"GET /v2/test/podman/blobs/{image.layer_digests[0]}' in mirror.log().replace(
            "%3A", ":"
        )


def test_containerd_pulls_through_the_mirror_with_ns(
    registry_none: Registry, tmp_path: Path, containerd: Path
) -> None:
    image = build_image(tmp_path / "image", "v1", [random_layer(200_000, seed=43)])
    push(image, registry_none, "test/ctr", "v1")
    with run_edgeproxy(tmp_path / "mirror", [upstream_entry(registry_none)]) as mirror:
        hosts = tmp_path / "hosts" / "docker.io"
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(
            'server = "https://registry-1.docker.io"\n'
            f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        result = subprocess.run(
            ["ctr", "--address", str(containerd), "images", "pull",
             "--hosts-dir", str(tmp_path / "hosts"), "docker.io/test/ctr:v1"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr + result.stdout
        log = mirror.log().replace("%3A", ":")
        assert f"GET /v2/test/ctr/blobs/{image.layer_digests[0]}?ns=docker.io" in log
        assert "registry-1.docker.io" not in result.stderr  # never fell back to the upstream


SIGNATURE = "application/vnd.cncf.notary.signature"


def push_referrer_by_tag_schema(registry: Registry, repo: str, subject: str) -> str:
    """A signature of `subject` pushed as notation and oras push to a registry without the
    referrers API (2.8): the artifact, then an index of it under the tag `sha256-<hex>`."""
    empty = b"{}"
    empty_digest = "sha256:" + hashlib.sha256(empty).hexdigest()
    with httpx.Client(base_url=registry.url, timeout=30) as client:
        upload = client.post(f"/v2/{repo}/blobs/uploads/").headers["location"]
        joiner = "&" if "?" in upload else "?"
        assert client.put(f"{upload}{joiner}digest={empty_digest}", content=empty).is_success
        descriptor = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_digest}
        artifact = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": SIGNATURE,
                "config": {**descriptor, "size": 2},
                "layers": [{**descriptor, "size": 2}],
                "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 1},
            }
        ).encode()
        digest = "sha256:" + hashlib.sha256(artifact).hexdigest()
        headers = {"Content-Type": OCI_MANIFEST}
        assert client.put(f"/v2/{repo}/manifests/{digest}", content=artifact, headers=headers)
        entry = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(artifact)}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {**entry, "artifactType": SIGNATURE}
        ]}  # fmt: skip
        tag = subject.replace(":", "-")
        headers = {"Content-Type": OCI_INDEX}
        assert client.put(f"/v2/{repo}/manifests/{tag}", content=json.dumps(index), headers=headers)
    return digest


def test_referrers_of_an_upstream_without_the_api(
    push_all: Callable[[Registry], dict[str, Pushed]], tmp_path: Path
) -> None:
    """registry:2 2.8 has no referrers API (404), so signing tools keep referrers under the
    OCI 1.1 tag schema. The mirror's referrers API lists them from that tag: a client that
    asks the API (rather than the tag) still finds the signature."""
    upstream = start_registry(tmp_path / "upstream")
    try:
        small = push_all(upstream)["small"]
        subject = small.image.manifest_digest
        url = f"{upstream.url}/v2/{small.repo}/referrers/{subject}"
        assert httpx.get(url).status_code == 404
        signature = push_referrer_by_tag_schema(upstream, small.repo, subject)
        with run_edgeproxy(tmp_path / "mirror", [upstream_entry(upstream)]) as mirror:
            path = f"{mirror.url}/v2/{small.repo}/referrers"
            found = httpx.get(f"{path}/{subject}")
            assert found.status_code == 200
            assert found.headers["content-type"] == OCI_INDEX
            [descriptor] = found.json()["manifests"]
            assert (descriptor["digest"], descriptor["artifactType"]) == (signature, SIGNATURE)
            other = httpx.get(f"{path}/{subject}", params={"artifactType": "application/x-sbom"})
            assert other.json()["manifests"] == []
            assert other.headers["oci-filters-applied"] == "artifactType"
            unsigned = httpx.get(f"{path}/{small.image.config_digest}")
            assert (unsigned.status_code, unsigned.json()["manifests"]) == (200, [])
            upstream.stop()  # the tag schema's index was cached: it still answers
            offline = httpx.get(f"{path}/{subject}")
            assert offline.json()["manifests"] == found.json()["manifests"]
            assert offline.headers["cache-status"] == STALE
            assert httpx.get(f"{path}/{small.image.config_digest}").status_code == 503
    finally:
        upstream.close()

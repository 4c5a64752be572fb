"""The upstream through an outbound HTTP proxy from the environment (HTTP_PROXY, HTTPS_PROXY,
NO_PROXY), as registry:2 and dockerd take it: a real registry behind a real proxy (tinyproxy),
pulled with skopeo. Manifests (httpx) and blobs (http.client threads) must take the same way."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.test_mirror_pull import pull, pulled_digest, upstream_entry
from tests.support.edge import make_certificate
from tests.support.images import Image, build_image, push, random_layer
from tests.support.registry import Registry, start_registry
from tests.support.servers import run_edgeproxy
from tests.support.tinyproxy import OUTGOING, run_tinyproxy

pytestmark = pytest.mark.e2e

CREDENTIALS = ("proxyuser", "pr0xy-pass")  # tinyproxy takes letters, digits and dashes
NO_ENV = {"NO_PROXY": "", "no_proxy": "", "ALL_PROXY": "", "all_proxy": ""}


def proxy_env(scheme: str, url: str) -> dict[str, str]:
    return {**NO_ENV, f"{scheme.upper()}_PROXY": url, f"{scheme}_proxy": url}


def image_of(tmp_path: Path, seed: int) -> Image:
    layers = [random_layer(2_500_000, seed=seed), random_layer(150_000, seed=seed + 1)]
    return build_image(tmp_path / "image", "v1", layers)


def remotes(upstream: Registry, since: int) -> set[str]:
    """The addresses the upstream's requests after the first `since` came from."""
    return {e.remote.rsplit(":", 1)[0] for e in upstream.access_log()[since:]}


def test_plain_upstream_through_a_proxy_with_credentials(
    registry_none: Registry, tmp_path: Path
) -> None:
    """HTTP_PROXY with a user: every manifest and blob request goes to the proxy in absolute
    form with Proxy-Authorization; the upstream sees the proxy only; each layer once."""
    image = image_of(tmp_path, seed=70)
    push(image, registry_none, "test/proxied", "v1")
    pushed = len(registry_none.access_log())
    with run_tinyproxy(tmp_path / "proxy", CREDENTIALS) as proxy:
        env = proxy_env("http", proxy.url(CREDENTIALS))
        entry = upstream_entry(registry_none)
        with run_edgeproxy(tmp_path / "mirror", [entry], env) as mirror:
            pull(mirror, "test/proxied:v1", tmp_path / "cold")
            assert "through the proxy http://127.0.0.1:" in mirror.log()
        requests = proxy.requests()
    assert pulled_digest(tmp_path / "cold") == image.manifest_digest
    base = f"GET {registry_none.url}/v2/test/proxied"
    for digest in image.layer_digests:
        assert sum(r.startswith(f"{base}/blobs/{digest} ") for r in requests) == 1, requests
    assert any(r.startswith(f"{base}/manifests/") for r in requests), requests
    assert remotes(registry_none, pushed) == {OUTGOING}


def test_https_upstream_through_a_proxy_tunnel(tmp_path: Path) -> None:
    """HTTPS_PROXY: CONNECT, then TLS with the upstream itself (its `ca` still decides the
    trust); nothing reaches the upstream but through the proxy."""
    certificate, key = make_certificate(tmp_path / "tls", "127.0.0.1")
    upstream = start_registry(tmp_path / "upstream", tls=(certificate, key))
    try:
        image = image_of(tmp_path, seed=72)
        push(image, upstream, "test/tunnel", "v1")
        pushed = len(upstream.access_log())
        entry = {**upstream_entry(upstream), "ca": str(certificate)}
        with run_tinyproxy(tmp_path / "proxy") as proxy:
            env = proxy_env("https", proxy.url())
            with run_edgeproxy(tmp_path / "mirror", [entry], env) as mirror:
                pull(mirror, "test/tunnel:v1", tmp_path / "cold")
            requests = proxy.requests()
        assert pulled_digest(tmp_path / "cold") == image.manifest_digest
        assert any(r.startswith(f"CONNECT {upstream.host} ") for r in requests), requests
        assert remotes(upstream, pushed) == {OUTGOING}
    finally:
        upstream.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_asking_for_credentials_is_a_clear_503(tmp_path: Path, scheme: str) -> None:
    """A proxy that wants credentials the environment does not give (407), on both ways out:
    manifests and blobs get 503 UNAVAILABLE naming the 407, never a 500 or a 407 itself."""
    tls = make_certificate(tmp_path / "tls", "127.0.0.1") if scheme == "https" else None
    upstream = start_registry(tmp_path / "upstream", tls=tls)
    try:
        image = image_of(tmp_path, seed=74)
        push(image, upstream, "test/refused", "v1")
        entry = upstream_entry(upstream) | ({"ca": str(tls[0])} if tls else {})
        with run_tinyproxy(tmp_path / "proxy", CREDENTIALS) as proxy:
            env = proxy_env(scheme, proxy.url())
            with run_edgeproxy(tmp_path / "mirror", [entry], env) as mirror:
                for path in ("manifests/v1", f"blobs/{image.layer_digests[0]}"):
                    response = httpx.get(f"{mirror.url}/v2/test/refused/{path}", timeout=30)
                    assert response.status_code == 503, (path, response.text)
                    error = response.json()["errors"][0]
                    assert error["code"] == "UNAVAILABLE", error
                    assert "407" in error["message"], error
        assert upstream.count("GET", "/blobs/" + image.layer_digests[0]) == 0
    finally:
        upstream.close()


def test_no_proxy_names_the_upstream(registry_none: Registry, tmp_path: Path) -> None:
    """NO_PROXY with the upstream's host: both ways out go direct, the proxy sees nothing."""
    image = image_of(tmp_path, seed=76)
    push(image, registry_none, "test/direct", "v1")
    pushed = len(registry_none.access_log())
    with run_tinyproxy(tmp_path / "proxy") as proxy:
        hosts = "localhost,127.0.0.1"
        env = {**proxy_env("http", proxy.url()), "NO_PROXY": hosts, "no_proxy": hosts}
        with run_edgeproxy(tmp_path / "mirror", [upstream_entry(registry_none)], env) as m:
            pull(m, "test/direct:v1", tmp_path / "cold")
        assert proxy.requests() == []
    assert pulled_digest(tmp_path / "cold") == image.manifest_digest
    assert remotes(registry_none, pushed) == {"127.0.0.1"}

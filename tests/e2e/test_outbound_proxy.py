"""The upstream through an outbound HTTP proxy from the environment (HTTP_PROXY, HTTPS_PROXY,
NO_PROXY), as registry:2 and dockerd take it: a real registry behind a real proxy (tinyproxy;
https:// behind a TLS listener), pulled with skopeo. Manifests (httpx) and blobs (http.client
threads) must take the same way."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_mirror_pull import pull, pulled_digest, upstream_entry
from tests.support.addresses import link_local_addresses
from tests.support.edge import make_certificate
from tests.support.images import Image, build_image, push, random_layer
from tests.support.registry import Registry, start_registry
from tests.support.servers import EdgeproxyProcess, run_edgeproxy
from tests.support.tinyproxy import OUTGOING, run_tinyproxy, tls_front

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


@contextmanager
def registry_outside(
    workdir: Path, *, tls: bool = False, mode: str = "none"
) -> Iterator[tuple[Registry, Path | None]]:
    """A registry at an address off 127.0.0.0/8, where the proxy is taken (Go never proxies a
    loopback one), and its certificate with `tls`; its auth `mode` (a token realm at the same
    address)."""
    with link_local_addresses(1) as (address,):
        certificate = make_certificate(workdir / "tls", address) if tls else None
        upstream = start_registry(workdir, mode, tls=certificate, address=address)
        try:
            yield upstream, certificate[0] if certificate else None
        finally:
            upstream.close()


def unavailable(mirror: EdgeproxyProcess, repository: str, image: Image, *said: str) -> None:
    """The image's manifest and first layer are 503 UNAVAILABLE, the message saying `said`."""
    for path in ("manifests/v1", f"blobs/{image.layer_digests[0]}"):
        response = httpx.get(f"{mirror.url}/v2/{repository}/{path}", timeout=30)
        assert response.status_code == 503, (path, response.text)
        error = response.json()["errors"][0]
        assert error["code"] == "UNAVAILABLE", error
        for words in said:
            assert words in error["message"], error


def test_plain_upstream_through_a_proxy_with_credentials(tmp_path: Path) -> None:
    """HTTP_PROXY with a user: every manifest and blob request goes to the proxy in absolute
    form with Proxy-Authorization; the upstream sees the proxy only; each layer once."""
    with registry_outside(tmp_path / "upstream") as (upstream, _):
        image = image_of(tmp_path, seed=70)
        push(image, upstream, "test/proxied", "v1")
        pushed = len(upstream.access_log())
        with run_tinyproxy(tmp_path / "proxy", CREDENTIALS) as proxy:
            env = proxy_env("http", proxy.url(CREDENTIALS))
            with run_edgeproxy(tmp_path / "mirror", [upstream_entry(upstream)], env) as mirror:
                pull(mirror, "test/proxied:v1", tmp_path / "cold")
                assert "through the proxy http://127.0.0.1:" in mirror.log()
            requests = proxy.requests()
        assert pulled_digest(tmp_path / "cold") == image.manifest_digest
        base = f"GET {upstream.url}/v2/test/proxied"
        for digest in image.layer_digests:
            assert sum(r.startswith(f"{base}/blobs/{digest} ") for r in requests) == 1, requests
        assert any(r.startswith(f"{base}/manifests/") for r in requests), requests
        assert remotes(upstream, pushed) == {OUTGOING}


def test_https_upstream_through_a_proxy_tunnel(tmp_path: Path) -> None:
    """HTTPS_PROXY: CONNECT, then TLS with the upstream itself (its `ca` still decides the
    trust); nothing reaches the upstream but through the proxy."""
    with registry_outside(tmp_path / "upstream", tls=True) as (upstream, certificate):
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


def bundle(path: Path, *certificates: Path | None) -> Path:
    """One CA file of `certificates` (an upstream's `ca`)."""
    path.write_bytes(b"".join(c.read_bytes() for c in certificates if c is not None))
    return path


def test_https_upstream_through_an_https_proxy(tmp_path: Path) -> None:
    """HTTPS_PROXY=https://...: TLS with the proxy (its certificate checked against the
    upstream's `ca`, as Go checks both with its RootCAs), CONNECT, then TLS with the upstream
    inside it, for manifests (httpx) and blobs (the threads' TLS in TLS) alike."""
    with registry_outside(tmp_path / "upstream", tls=True) as (upstream, certificate):
        image = image_of(tmp_path, seed=84)
        push(image, upstream, "test/tls-in-tls", "v1")
        pushed = len(upstream.access_log())
        proxy_certificate, proxy_key = make_certificate(tmp_path / "proxy-tls", "127.0.0.1")
        ca = bundle(tmp_path / "ca.pem", certificate, proxy_certificate)
        entry = {**upstream_entry(upstream), "ca": str(ca)}
        with run_tinyproxy(tmp_path / "proxy") as proxy:
            with tls_front(proxy, proxy_certificate, proxy_key) as handshakes:
                env = proxy_env("https", proxy.url())
                with run_edgeproxy(tmp_path / "mirror", [entry], env) as mirror:
                    pull(mirror, "test/tls-in-tls:v1", tmp_path / "cold")
                    assert f"through the proxy {proxy.url()}" in mirror.log()
            requests = proxy.requests()
        assert pulled_digest(tmp_path / "cold") == image.manifest_digest
        assert handshakes[0] >= len(requests) >= 2, requests  # httpx's, the threads'
        assert all(r.startswith(f"CONNECT {upstream.host} ") for r in requests), requests
        assert remotes(upstream, pushed) == {OUTGOING}
        for digest in image.layer_digests:  # the threads' GETs, through the proxy
            assert upstream.wait_count("GET", f"/blobs/{digest}", 1) == 1


def test_plain_upstream_through_an_https_proxy_with_credentials(tmp_path: Path) -> None:
    """HTTP_PROXY=https://user:password@...: every request in absolute form with
    Proxy-Authorization, inside TLS with the proxy, for tokens, manifests and blobs."""
    with registry_outside(tmp_path / "upstream", mode="token") as (upstream, _):
        image = image_of(tmp_path, seed=86)
        push(image, upstream, "test/forwarded", "v1")
        pushed = len(upstream.access_log())
        proxy_certificate, proxy_key = make_certificate(tmp_path / "proxy-tls", "127.0.0.1")
        entry = {**upstream_entry(upstream), "ca": str(proxy_certificate)}
        with run_tinyproxy(tmp_path / "proxy", CREDENTIALS) as proxy:
            with tls_front(proxy, proxy_certificate, proxy_key):
                env = proxy_env("http", proxy.url(CREDENTIALS))
                with run_edgeproxy(tmp_path / "mirror", [entry], env) as mirror:
                    pull(mirror, "test/forwarded:v1", tmp_path / "cold")
            requests = proxy.requests()
        assert pulled_digest(tmp_path / "cold") == image.manifest_digest
        base = f"GET {upstream.url}/v2/test/forwarded"
        for digest in image.layer_digests:
            assert sum(r.startswith(f"{base}/blobs/{digest} ") for r in requests) == 1, requests
        assert any(r.startswith(f"{base}/manifests/") for r in requests), requests
        assert upstream.token_server is not None
        realm = upstream.token_server.realm
        assert any(r.startswith(f"GET {realm}?") for r in requests), requests
        assert remotes(upstream, pushed) == {OUTGOING}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_https_proxy_not_trusted_is_a_clear_503(tmp_path: Path, scheme: str) -> None:
    """An https:// proxy whose certificate the upstream's trust does not hold: no request
    goes through it, the client gets 503 UNAVAILABLE that says why (it said "ConnectError"
    only), and so does the log."""
    tls = scheme == "https"
    with registry_outside(tmp_path / "upstream", tls=tls) as (upstream, certificate):
        image = image_of(tmp_path, seed=88)
        push(image, upstream, "test/untrusted", "v1")
        entry = upstream_entry(upstream) | ({"ca": str(certificate)} if certificate else {})
        proxy_certificate, proxy_key = make_certificate(tmp_path / "proxy-tls", "127.0.0.1")
        with run_tinyproxy(tmp_path / "proxy") as proxy:
            with tls_front(proxy, proxy_certificate, proxy_key) as handshakes:
                env = proxy_env(scheme, proxy.url())
                with run_edgeproxy(tmp_path / "mirror", [entry], env) as mirror:
                    unavailable(
                        mirror, "test/untrusted", image, "through the proxy: ", "VERIFY_FAILED"
                    )
                    assert "CERTIFICATE_VERIFY_FAILED" in mirror.log()
            assert handshakes == [0]
            assert proxy.requests() == []
        assert upstream.count("GET", "/blobs/" + image.layer_digests[0]) == 0


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_asking_for_credentials_is_a_clear_503(tmp_path: Path, scheme: str) -> None:
    """A proxy that wants credentials the environment does not give (407), on both ways out:
    manifests and blobs get 503 UNAVAILABLE naming the 407, never a 500 or a 407 itself."""
    tls = scheme == "https"
    with registry_outside(tmp_path / "upstream", tls=tls) as (upstream, certificate):
        image = image_of(tmp_path, seed=74)
        push(image, upstream, "test/refused", "v1")
        entry = upstream_entry(upstream) | ({"ca": str(certificate)} if certificate else {})
        with run_tinyproxy(tmp_path / "proxy", CREDENTIALS) as proxy:
            env = proxy_env(scheme, proxy.url())
            with run_edgeproxy(tmp_path / "mirror", [entry], env) as mirror:
                unavailable(mirror, "test/refused", image, "407")
        assert upstream.count("GET", "/blobs/" + image.layer_digests[0]) == 0


def test_no_proxy_names_the_upstream(tmp_path: Path) -> None:
    """NO_PROXY with the upstream's host: both ways out go direct, the proxy sees nothing."""
    with registry_outside(tmp_path / "upstream") as (upstream, _):
        image = image_of(tmp_path, seed=76)
        push(image, upstream, "test/direct", "v1")
        pushed = len(upstream.access_log())
        with run_tinyproxy(tmp_path / "proxy") as proxy:
            hosts = f"localhost,{upstream.address}"
            env = {**proxy_env("http", proxy.url()), "NO_PROXY": hosts, "no_proxy": hosts}
            with run_edgeproxy(tmp_path / "mirror", [upstream_entry(upstream)], env) as m:
                pull(m, "test/direct:v1", tmp_path / "cold")
            assert proxy.requests() == []
        assert pulled_digest(tmp_path / "cold") == image.manifest_digest
        assert remotes(upstream, pushed) == {upstream.address}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_loopback_upstream_is_never_proxied(tmp_path: Path, scheme: str) -> None:
    """An upstream on 127.0.0.1 goes direct with a proxy and no NO_PROXY, as registry:2 and
    dockerd take it (Go's rule): the proxy would reach its own host's port, not this one's."""
    tls = make_certificate(tmp_path / "tls", "127.0.0.1") if scheme == "https" else None
    upstream = start_registry(tmp_path / "upstream", tls=tls)
    try:
        image = image_of(tmp_path, seed=82)
        push(image, upstream, "test/local", "v1")
        pushed = len(upstream.access_log())
        entry = upstream_entry(upstream) | ({"ca": str(tls[0])} if tls else {})
        with run_tinyproxy(tmp_path / "proxy") as proxy:
            with run_edgeproxy(tmp_path / "mirror", [entry], proxy_env(scheme, proxy.url())) as m:
                pull(m, "test/local:v1", tmp_path / "cold")
            assert proxy.requests() == []
        assert pulled_digest(tmp_path / "cold") == image.manifest_digest
        assert remotes(upstream, pushed) == {"127.0.0.1"}
    finally:
        upstream.close()


def test_a_cidr_in_no_proxy_sends_its_upstream_direct(tmp_path: Path) -> None:
    """NO_PROXY with a network (`169.254.253.0/31`, as registry:2 and dockerd read it):
    manifests and blobs of the upstream at an address in it go direct (the proxy logs none of
    them), while another upstream, at an address outside it, still goes through the proxy."""
    with link_local_addresses(2) as (address, other_address):
        inside = start_registry(tmp_path / "inside", address=address)
        outside = start_registry(tmp_path / "outside", address=other_address)
        try:
            image, other = image_of(tmp_path / "a", seed=78), image_of(tmp_path / "b", seed=80)
            push(image, inside, "test/inside", "v1")
            push(other, outside, "test/outside", "v1")  # other blobs: none cached by the first
            pushed = len(inside.access_log())
            network = str(ipaddress.ip_network(f"{address}/31", strict=False))
            assert ipaddress.ip_address(other_address) not in ipaddress.ip_network(network)
            entries = [
                upstream_entry(inside, "inside.example"),
                upstream_entry(outside, "outside.example"),
            ]
            with run_tinyproxy(tmp_path / "proxy") as proxy:
                env = {**proxy_env("http", proxy.url()), "NO_PROXY": network, "no_proxy": network}
                with run_edgeproxy(tmp_path / "mirror", entries, env) as mirror:
                    pull(mirror, "inside.example/test/inside:v1", tmp_path / "inside-pull")
                    pull(mirror, "outside.example/test/outside:v1", tmp_path / "outside-pull")
                requests = proxy.requests()
            assert pulled_digest(tmp_path / "inside-pull") == image.manifest_digest
            assert pulled_digest(tmp_path / "outside-pull") == other.manifest_digest
            assert not [r for r in requests if inside.host in r], requests  # health checks too
            assert remotes(inside, pushed) == {address}
            base = f"GET {outside.url}/v2/test/outside"
            assert any(r.startswith(f"{base}/manifests/") for r in requests), requests
            for digest in other.layer_digests:
                assert any(r.startswith(f"{base}/blobs/{digest} ") for r in requests), requests
        finally:
            inside.close()
            outside.close()

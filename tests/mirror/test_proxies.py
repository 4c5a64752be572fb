"""Which proxy of the environment a blob thread takes: the same one httpx takes."""

from __future__ import annotations

import base64

import httpx
import pytest

from edgeproxy.mirror.proxies import ProxyError, environment_proxy, parse_proxy

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def proxy_of(url: str) -> str | None:
    """The proxy a blob thread takes to `url`: its host:port, or None (direct)."""
    parsed = httpx.URL(url)
    proxy = environment_proxy(parsed.scheme, parsed.netloc.decode())
    return proxy.netloc if proxy else None


def test_a_proxy_url_with_credentials() -> None:
    proxy = parse_proxy("http://us%40er:p%20ss@proxy.example:3128")
    assert proxy.netloc == "proxy.example:3128"
    assert proxy.shown == "http://proxy.example:3128"  # no credentials in logs
    expected = base64.b64encode(b"us@er:p ss").decode()
    assert proxy.headers == {"Proxy-Authorization": f"Basic {expected}"}


def test_a_bare_proxy_address_is_http_as_httpx_takes_it() -> None:
    assert parse_proxy("proxy.example:3128").netloc == "proxy.example:3128"
    assert parse_proxy("http://[::1]").netloc == "[::1]:80"
    assert parse_proxy("http://proxy.example").headers == {}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("socks5://proxy:1080", "socks5:// proxies are not supported"),
        ("https://proxy:3128", "https:// proxies are not supported"),
        ("http://proxy:99999", "port is not a number"),
        ("http://:3128", "no host"),
    ],
)
def test_proxies_a_blob_thread_cannot_use(url: str, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        parse_proxy(url)


def test_the_proxy_by_scheme_all_and_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://secure:1")
    monkeypatch.setenv("ALL_PROXY", "http://every:2")
    monkeypatch.setenv("NO_PROXY", "internal.example,10.0.0.7")
    assert proxy_of("https://registry-1.docker.io") == "secure:1"
    assert proxy_of("http://cdn.example:8080") == "every:2"
    assert proxy_of("https://mirror.internal.example") is None
    assert proxy_of("http://10.0.0.7:5000") is None
    monkeypatch.delenv("ALL_PROXY")
    assert proxy_of("http://cdn.example") is None


@pytest.mark.parametrize(
    ("no_proxy", "url"),
    [
        ("internal.example,10.0.0.7", "https://registry-1.docker.io"),
        ("internal.example,10.0.0.7", "https://mirror.internal.example"),
        ("internal.example,10.0.0.7", "http://10.0.0.7"),
        ("localhost, *", "https://registry-1.docker.io"),  # "*" among others: nothing
        (".example.com", "https://example.com"),  # a leading dot: subdomains only
        (".example.com", "https://cdn.example.com"),
        ("::1", "http://[::1]:5000"),  # an IPv6 address, without brackets
        ("https://registry.example", "https://registry.example"),  # with its scheme
        ("https://registry.example", "http://registry.example"),
        ("registry.example:5000", "https://registry.example:5000"),
        ("registry.example:5000", "https://registry.example:6000"),
    ],
)
def test_the_same_choice_as_httpx(monkeypatch: pytest.MonkeyPatch, no_proxy: str, url: str) -> None:
    """Manifests (httpx) and their blobs (the threads) must leave the same way."""
    monkeypatch.setenv("HTTPS_PROXY", "http://secure:1")
    monkeypatch.setenv("HTTP_PROXY", "http://plain:2")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    transport = httpx.Client()._transport_for_url(httpx.URL(url))  # httpx's own choice
    theirs = getattr(getattr(transport, "_pool", None), "_proxy_url", None)
    assert proxy_of(url) == (theirs and f"{theirs.host.decode()}:{theirs.port}")

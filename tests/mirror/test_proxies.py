"""Which proxy of the environment an upstream request takes, as Go's net/http takes it
(golang.org/x/net/http/httpproxy: registry:2, dockerd, containerd): the httpx client and the
blob threads share the choice."""

from __future__ import annotations

import asyncio
import base64
import ssl

import httpx
import pytest

from edgeproxy.mirror.proxies import Proxies, ProxyError, ProxyTransport, parse_proxy
from tests.support.ports import free_port


def proxy_of(url: str, **environ: str) -> str | None:
    """The proxy a request to `url` takes in `environ`: its host:port, or None (direct)."""
    parsed = httpx.URL(url)
    proxy = Proxies(environ).choose(parsed.scheme, parsed.netloc.decode())
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
    assert not parse_proxy("proxy.example:3128").tls


def test_an_https_proxy_is_spoken_to_in_tls() -> None:
    """As Go (registry:2, dockerd) takes HTTPS_PROXY=https://...: TLS with the proxy, on 443
    unless the URL says otherwise."""
    proxy = parse_proxy("https://user:pw@proxy.example")
    assert (proxy.netloc, proxy.shown, proxy.tls) == (
        "proxy.example:443",
        "https://proxy.example:443",
        True,
    )
    assert proxy.host == "proxy.example"  # the name its certificate must hold
    assert proxy.headers["Proxy-Authorization"].startswith("Basic ")
    assert parse_proxy("https://[2001:db8::1]:3129").host == "2001:db8::1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("socks5://proxy:1080", r"socks5:// proxies are not supported \(use http:// or https://\)"),
        ("http://proxy:99999", "port is not a number"),
        ("http://:3128", "no host"),
    ],
)
def test_proxies_a_blob_thread_cannot_use(url: str, message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        parse_proxy(url)


def test_the_proxy_by_scheme_all_and_no_proxy() -> None:
    env = {"HTTPS_PROXY": "http://secure:1", "ALL_PROXY": "http://every:2"}
    env["NO_PROXY"] = "internal.example,10.0.0.7"
    assert proxy_of("https://registry-1.docker.io", **env) == "secure:1"
    assert proxy_of("http://cdn.example:8080", **env) == "every:2"
    assert proxy_of("https://mirror.internal.example", **env) is None
    assert proxy_of("http://10.0.0.7:5000", **env) is None
    del env["ALL_PROXY"]
    assert proxy_of("http://cdn.example", **env) is None  # HTTPS_PROXY is for https only


def test_upper_case_first_and_an_empty_variable_is_unset() -> None:
    """Go's order; urllib (httpx) takes the lower-case one, and an empty one as "none"."""
    assert proxy_of("http://a.example", HTTP_PROXY="upper:1", http_proxy="lower:2") == "upper:1"
    assert proxy_of("http://a.example", HTTP_PROXY="", http_proxy="lower:2") == "lower:2"
    env = {"HTTP_PROXY": "upper:1", "NO_PROXY": "", "no_proxy": "a.example"}
    assert proxy_of("http://a.example", **env) is None


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        # An address, a CIDR: an address of the URL, IPv4 or IPv6.
        ("10.0.0.7", "https://10.0.0.7:5000", True),
        ("10.0.0.7", "https://10.0.0.8", False),
        ("10.0.0.0/8", "https://10.1.2.3", True),
        ("10.0.0.0/8", "https://11.1.2.3", False),
        ("10.1.2.3/8", "https://10.200.0.1", True),  # host bits set: Go takes the network
        ("192.168.0.0/16", "http://192.168.4.5:8080", True),
        ("fd00::/8", "https://[fd12:3456::1]:5000", True),
        ("fd00::/8", "https://[fe80::1]", False),
        ("::1", "https://[::1]", True),
        ("2001:db8::1", "https://[2001:db8::1]:5000", True),
        ("[2001:db8::1]", "https://[2001:db8::1]", True),  # in brackets: Go ignores it
        ("10.0.0.0/8", "https://[::ffff:10.1.2.3]", True),  # IPv4-mapped: the IPv4 address
        ("10.0.0.0/8", "https://ten.example", False),  # a CIDR matches no name
        # host:port, [IPv6]:port: that port only, the scheme's default when none is written.
        ("registry.example:5000", "https://registry.example:5000", True),
        ("registry.example:5000", "https://registry.example:6000", False),
        ("registry.example:5000", "https://registry.example", False),
        ("registry.example:443", "https://registry.example", True),
        ("10.0.0.7:5000", "https://10.0.0.7:5000", True),
        ("10.0.0.7:5000", "https://10.0.0.7:6000", False),
        ("[2001:db8::1]:5000", "https://[2001:db8::1]:5000", True),
        ("[2001:db8::1]:5000", "https://[2001:db8::1]:6000", False),
        # A domain: itself and its subdomains; with a leading dot or `*.`: subdomains only.
        ("example.com", "https://example.com", True),
        ("example.com", "https://cdn.example.com", True),
        ("example.com", "https://notexample.com", False),
        (".example.com", "https://example.com", False),
        (".example.com", "https://cdn.example.com", True),
        ("*.example.com", "https://example.com", False),
        ("*.example.com", "https://a.b.example.com", True),
        ("Example.COM ", "https://CDN.example.com", True),  # case and spaces do not matter
        ("bücher.example", "https://xn--bcher-kva.example", True),  # IDNA, as the URL's
        # `*` among the others: every host.
        ("localhost, *", "https://registry-1.docker.io", True),
        ("*", "http://10.0.0.7", True),
        # Malformed entries match nothing (Go: best effort); the others still apply.
        ("10.0.0.0/33,:5000,example.com", "https://example.com", True),
        ("10.0.0.0/33", "https://10.0.0.1", False),
        # With a scheme (httpx reads it; Go matches nothing): that scheme only.
        ("https://registry.example", "https://registry.example", True),
        ("https://registry.example", "http://registry.example", False),
        ("", "https://registry.example", False),
    ],
)
def test_no_proxy_as_go_reads_it(no_proxy: str, url: str, direct: bool) -> None:
    env = {"HTTPS_PROXY": "http://secure:1", "HTTP_PROXY": "http://plain:2", "NO_PROXY": no_proxy}
    assert (proxy_of(url, **env) is None) == direct


@pytest.mark.parametrize(
    "url", ["http://localhost:5000", "https://LOCALHOST", "http://127.0.0.1", "http://127.9.8.7:5000",
            "https://[::1]:5000", "https://[::ffff:127.0.0.1]"],
)  # fmt: skip
def test_loopback_hosts_are_never_proxied(url: str) -> None:
    """As Go: the proxy cannot reach this host's own services (it would reach its own)."""
    assert proxy_of(url, HTTPS_PROXY="secure:1", HTTP_PROXY="plain:2") is None


def test_a_name_of_this_host_is_proxied() -> None:
    """Only `localhost` and loopback addresses: any other name may be anywhere (as Go)."""
    assert proxy_of("http://localhost.example", HTTP_PROXY="plain:2") == "plain:2"


def test_a_bad_proxy_names_its_variable() -> None:
    with pytest.raises(ProxyError, match=r"^HTTPS_PROXY: socks5:// proxies are not supported"):
        Proxies({"https_proxy": "socks5://proxy:1080"})


def test_an_all_proxy_the_threads_cannot_use_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    """ALL_PROXY is curl's (a desktop's `socks5://` for every tool): Go, and so registry:2,
    never reads it; edgeproxy reads a usable one, and starts without one it cannot use."""
    assert proxy_of("https://r.example", ALL_PROXY="socks5://proxy:1080") is None
    assert proxy_of("https://r.example", ALL_PROXY="http://:3128") is None
    assert "ALL_PROXY: socks5:// proxies are not supported" in caplog.text
    assert "ALL_PROXY: the proxy URL has no host" in caplog.text
    assert proxy_of("https://r.example", ALL_PROXY="http://every:2") == "every:2"


def test_the_httpx_transport_takes_the_same_way() -> None:
    """Each request of the httpx client (redirects and token realms included) goes where
    `choose` says, with the proxy's credentials; one pool per proxy."""
    proxies = Proxies({"HTTPS_PROXY": "http://us:pw@secure:1", "NO_PROXY": "10.0.0.0/8"})
    transport = ProxyTransport(proxies)

    def pool_of(url: str) -> object:
        return transport._transport_for(httpx.URL(url))._pool

    proxied = pool_of("https://registry.example")
    assert proxied._proxy_url.host == b"secure"  # type: ignore[attr-defined]
    assert proxied._proxy_ssl_context is None  # type: ignore[attr-defined]
    authorization = base64.b64encode(b"us:pw")
    assert (b"Proxy-Authorization", b"Basic " + authorization) in proxied._proxy_headers  # type: ignore[attr-defined]
    assert pool_of("https://cdn.example:8443") is proxied
    for direct in ("https://10.1.2.3:5000", "https://127.0.0.1", "http://registry.example"):
        assert not hasattr(pool_of(direct), "_proxy_url"), direct


def test_an_https_proxy_is_checked_with_the_context_given() -> None:
    """The httpx client's https:// proxy: its certificate checked with `proxy_tls`'s context
    (the upstream's trust), made once, when a request first goes through that proxy."""
    made: list[ssl.SSLContext] = []

    def proxy_tls() -> ssl.SSLContext:
        made.append(ssl.create_default_context())
        return made[-1]

    transport = ProxyTransport(Proxies({"HTTPS_PROXY": "https://secure:3129"}), proxy_tls)
    assert made == []
    pool = transport._transport_for(httpx.URL("https://registry.example"))._pool
    assert transport._transport_for(httpx.URL("https://cdn.example"))._pool is pool
    assert pool._proxy_url.scheme == b"https"  # type: ignore[attr-defined]
    assert pool._proxy_ssl_context is made[0] and len(made) == 1  # type: ignore[attr-defined]


def test_a_connection_through_the_proxy_that_fails_says_so() -> None:
    """A proxy that refuses the connection (or whose certificate is not trusted) is an
    httpx.ProxyError, which the upstream's 503 names ("through the proxy: ..."), as the blob
    threads say it: it was a ConnectError, and the 503 said "ConnectError" only."""
    proxies = Proxies({"HTTPS_PROXY": f"https://127.0.0.1:{free_port()}"})

    async def main() -> None:
        async with httpx.AsyncClient(transport=ProxyTransport(proxies), trust_env=False) as c:
            with pytest.raises(httpx.ProxyError, match=r"\S") as caught:
                await c.get("https://registry.example/v2/")
            assert isinstance(caught.value.__cause__, httpx.ConnectError)
            with pytest.raises(httpx.ConnectError):  # direct: as it was
                await c.get(f"https://127.0.0.1:{free_port()}/v2/")

    asyncio.run(main())

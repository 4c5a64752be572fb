"""The outbound HTTP proxy an upstream is reached through, from the environment.

`HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` (or their lower-case forms), read as registry:2,
dockerd and containerd read them (Go's net/http, golang.org/x/net/http/httpproxy), plus
`ALL_PROXY` for either scheme as curl reads it. One `Proxies` chooses for both ways out: the
httpx client (`ProxyTransport`) and the blob threads (http.client, which reads none of them),
so that a manifest and its layers take the same way out. An https:// proxy's certificate is
checked with the upstream's trust (`upstream.ssl_context`), as Go's transport checks
the proxy's and the upstream's with its one RootCAs.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import ipaddress
import logging
import os
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger("edgeproxy.proxies")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}


class ProxyError(ValueError):
    """A proxy variable that cannot be used."""


@dataclass(frozen=True, eq=False)  # one per variable: ProxyTransport keeps a transport by it
class Proxy:
    """An HTTP proxy: where to connect, and the headers that carry its credentials."""

    netloc: str  # host:port of the proxy
    headers: dict[str, str]  # Proxy-Authorization, when the URL has a user
    shown: str  # the URL without credentials, for logs
    tls: bool = False  # an https:// proxy: TLS with the proxy itself, requests inside it

    @property
    def host(self) -> str:
        """The proxy's host, without brackets: the name its certificate must hold."""
        return urllib.parse.urlsplit(f"//{self.netloc}").hostname or ""


@dataclass(frozen=True)
class Direct:
    """One NO_PROXY entry: a network (an address is a network of one), or a domain."""

    network: IPNetwork | None
    domain: str  # ".example.com": its subdomains; "" for a network
    itself: bool  # the domain itself too (written without the leading dot)
    port: str  # only this port (`host:port`); "" for any
    scheme: str | None  # only this scheme (`https://host`, as httpx reads it; Go never matches)

    def matches(self, scheme: str, host: str, port: int, ip: IPAddress | None) -> bool:
        if self.scheme not in (None, scheme) or self.port not in ("", str(port)):
            return False
        if self.network is not None:
            return ip is not None and ip in self.network
        return host.endswith(self.domain) or (self.itself and host == self.domain[1:])


class Proxies:
    """The proxies of an environment, chosen for each upstream origin as Go chooses them.

    Where Go's rules and httpx's differ, Go's: a CIDR (`10.0.0.0/8`, `fd00::/8`) matches an
    address; `host:port` that port only; `example.com` the domain and its subdomains,
    `.example.com` (or `*.example.com`) its subdomains only; `*` every host; `localhost` and
    loopback addresses are never proxied; `HTTPS_PROXY` wins over `https_proxy`. Beyond Go:
    an address in brackets (`[::1]`) is read, not ignored.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        """Raise ProxyError, naming the variable, for a proxy the blob threads cannot use.
        An ALL_PROXY they cannot use (`socks5://`, set for other tools) is left out, with a
        warning: Go, and so registry:2, never reads it."""
        try:
            fallback = _proxy_variable(environ, "ALL_PROXY")
        except ProxyError as exc:
            _ignored(str(exc))
            fallback = None
        self._by_scheme = {
            scheme: _proxy_variable(environ, f"{scheme.upper()}_PROXY") or fallback
            for scheme in DEFAULT_PORTS
        }
        entries = [e.strip().lower() for e in _variable(environ, "NO_PROXY").split(",")]
        self._everything_direct = "*" in entries
        self._direct = [_direct(entry) for entry in entries if entry]

    @classmethod
    def from_environment(cls) -> Proxies:
        return cls(os.environ)

    def choose(self, scheme: str, netloc: str) -> Proxy | None:
        """The proxy for requests to `scheme://netloc`, or None for a direct connection."""
        proxy = self._by_scheme.get(scheme)
        if proxy is None or self._everything_direct:
            return None
        parts = urllib.parse.urlsplit(f"//{netloc}")
        host = parts.hostname or ""  # lower case, without brackets
        port = parts.port or DEFAULT_PORTS[scheme]
        ip = _address(host)
        if host == "localhost" or (ip is not None and ip.is_loopback):
            return None  # as Go: the proxy could not reach this host's own services
        if any(direct.matches(scheme, host, port, ip) for direct in self._direct):
            return None
        return proxy


class ProxyTransport(httpx.AsyncBaseTransport):
    """httpx's transport, sending each request direct or through the proxy `proxies` choose
    for its URL (redirects and token realms on other hosts included): httpx's own choice, by
    URL patterns, cannot read a CIDR nor spare loopback hosts."""

    def __init__(
        self,
        proxies: Proxies,
        proxy_tls: Callable[[], ssl.SSLContext] | None = None,
        **options: Any,
    ) -> None:
        """`proxy_tls`: makes the context an https:// proxy's certificate is checked with
        (once a proxy, when one is used; httpcore's default context without it). `options`:
        httpx.AsyncHTTPTransport's, for every connection made."""
        self._proxies = proxies
        self._proxy_tls = proxy_tls
        self._options = options
        self._direct = httpx.AsyncHTTPTransport(**options)
        self._through: dict[Proxy, httpx.AsyncHTTPTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self._transport_for(request.url)
        try:
            return await transport.handle_async_request(request)
        except httpx.ConnectError as exc:
            if transport is self._direct:
                raise
            # Say which way failed, as the blob threads do: the proxy refused the connection,
            # or its certificate (or the upstream's, inside its tunnel) is not trusted.
            raise httpx.ProxyError(str(exc) or type(exc).__name__, request=request) from exc

    def _transport_for(self, url: httpx.URL) -> httpx.AsyncHTTPTransport:
        proxy = self._proxies.choose(url.scheme, url.netloc.decode("ascii"))
        if proxy is None:
            return self._direct
        transport = self._through.get(proxy)
        if transport is None:
            tls = self._proxy_tls() if proxy.tls and self._proxy_tls else None
            through = httpx.Proxy(proxy.shown, ssl_context=tls, headers=proxy.headers)
            transport = self._through[proxy] = httpx.AsyncHTTPTransport(
                proxy=through, **self._options
            )
        return transport

    async def aclose(self) -> None:
        await self._direct.aclose()
        for transport in self._through.values():
            await transport.aclose()


def parse_proxy(url: str) -> Proxy:
    """A proxy URL (`http://user:password@host:port`, or `https://` for TLS with the proxy; a
    bare `host:port` is taken as http, as Go and httpx take it)."""
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ProxyError(f"{parts.scheme}:// proxies are not supported (use http:// or https://)")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ProxyError("the proxy's port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ProxyError("the proxy URL has no host")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    headers = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Proxy-Authorization"] = f"Basic {token}"
    scheme = parts.scheme
    return Proxy(f"{host}:{port}", headers, f"{scheme}://{host}:{port}", scheme == "https")


def _variable(environ: Mapping[str, str], name: str) -> str:
    """`name`'s value, else its lower-case form's (Go's order: an empty one is unset)."""
    return environ.get(name) or environ.get(name.lower()) or ""


def _proxy_variable(environ: Mapping[str, str], name: str) -> Proxy | None:
    value = _variable(environ, name)
    try:
        return parse_proxy(value) if value else None
    except ProxyError as exc:
        raise ProxyError(f"{name}: {exc}") from None


@functools.cache  # once a process: every upstream client reads the environment
def _ignored(reason: str) -> None:
    log.warning("%s: left out, as registry:2 leaves ALL_PROXY out", reason)


def _direct(entry: str) -> Direct:
    """A NO_PROXY entry, lower case: as Go reads it, a malformed one matches nothing."""
    scheme = None
    if "://" in entry:
        scheme, _, entry = entry.partition("://")
    if "/" in entry:
        try:
            return Direct(ipaddress.ip_network(entry, strict=False), "", False, "", scheme)
        except ValueError:
            pass
    host, port = entry, ""
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
    elif entry.count(":") == 1:  # host:port (more colons: an IPv6 address)
        host, port = entry.split(":")
    ip = _address(host)
    if ip is not None:
        return Direct(ipaddress.ip_network(ip), "", False, port, scheme)
    if host.startswith("*."):
        host = host[1:]
    itself = not host.startswith(".")
    domain = host.removeprefix(".")
    with contextlib.suppress(UnicodeError):
        domain = domain.encode("idna").decode("ascii")  # as the URL's host is
    return Direct(None, f".{domain}", itself, port, scheme)


def _address(host: str) -> IPAddress | None:
    """`host` as an IP address, an IPv4-mapped IPv6 one as IPv4 (as Go compares them)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip

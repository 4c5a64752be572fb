"""The outbound HTTP proxy an upstream is reached through, from the environment.

`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (or their lower-case forms), as
registry:2, dockerd and curl read them. httpx reads them itself for the small requests; this
module gives the blob threads (http.client, which reads none of them) the same choice, so that
a manifest and its layers take the same way out.
"""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass

import httpx
from httpx._utils import URLPattern, get_environment_proxies


class ProxyError(ValueError):
    """A proxy variable that cannot be used."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: where to connect, and the headers that carry its credentials."""

    netloc: str  # host:port of the proxy
    headers: dict[str, str]  # Proxy-Authorization, when the URL has a user
    shown: str  # the URL without credentials, for logs


def environment_proxy(scheme: str, netloc: str) -> Proxy | None:
    """The proxy for requests to `scheme://netloc`, or None for a direct connection.

    httpx's own rules, not urllib's: they read NO_PROXY differently (`*` among other names,
    `.domain`, an IPv6 address, `scheme://host`), and the blobs must go where the manifests go.
    """
    url = httpx.URL(f"{scheme}://{netloc}")
    for pattern, proxy in environment_mounts():
        if pattern.matches(url):
            return parse_proxy(proxy) if proxy else None
    return None


def environment_mounts() -> list[tuple[URLPattern, str | None]]:
    """httpx's table for the environment, in the order its client tries it (the most
    specific pattern first): a proxy URL, or None for NO_PROXY."""
    try:
        mounts = [(URLPattern(key), url) for key, url in get_environment_proxies().items()]
    except httpx.InvalidURL as exc:  # only NO_PROXY's names are patterns
        raise ProxyError(f"NO_PROXY: {exc}") from None
    return sorted(mounts, key=lambda mount: mount[0])


def parse_proxy(url: str) -> Proxy:
    """A proxy URL (`http://user:password@host:port`; a bare `host:port` is taken as
    http, as httpx takes it). Only http proxies: http.client cannot speak TLS inside TLS."""
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ProxyError(f"{parts.scheme}:// proxies are not supported (use http://)")
    try:
        port = parts.port or 80
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
    return Proxy(f"{host}:{port}", headers, f"http://{host}:{port}")

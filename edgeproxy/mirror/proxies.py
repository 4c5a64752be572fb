"""The outbound HTTP proxy an upstream is reached through, from the environment.

`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (or their lower-case forms), as
registry:2, dockerd and curl read them. httpx reads them itself for the small requests; this
module gives the blob threads (http.client, which reads none of them) the same choice, so that
a manifest and its layers take the same way out.
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from dataclasses import dataclass


class ProxyError(ValueError):
    """A proxy variable that cannot be used."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: where to connect, and the headers that carry its credentials."""

    netloc: str  # host:port of the proxy
    headers: dict[str, str]  # Proxy-Authorization, when the URL has a user
    shown: str  # the URL without credentials, for logs


def environment_proxy(scheme: str, netloc: str) -> Proxy | None:
    """The proxy for requests to `scheme://netloc`, or None for a direct connection."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass(netloc):  # NO_PROXY, on Linux
        return None
    return parse_proxy(url)


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

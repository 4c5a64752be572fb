"""Loopback port helpers."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.error
import urllib.request

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, and never one returned
    before in this run: two calls before either port is bound (an edge's http and https)
    could otherwise get the same one, which `edgeproxy check` refuses."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Poll until a TCP connect to host:port succeeds; raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{host}:{port} not accepting connections") from exc
            time.sleep(0.05)


def http_status(url: str, timeout: float = 1.0, *, verify: bool = True) -> int | None:
    """The status of a GET, None when nothing answers; `verify=False` takes any certificate."""
    context = None
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except OSError:
        return None

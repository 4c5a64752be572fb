"""Addresses of this machine that are not loopback ones, without leaving loopback.

Go (registry:2, dockerd) and edgeproxy never send a loopback upstream (127.0.0.0/8, ::1)
through a proxy; a test of the proxy needs an upstream at another address. A link-local one
(169.254/16) put on the loopback interface for the test's time is such an address, and its
traffic never leaves the machine.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

SUBNET = "169.254.253"  # bench/ puts its veth pairs in 169.254.1-250


@contextmanager
def link_local_addresses(count: int) -> Iterator[list[str]]:
    """`count` IPv4 addresses on `lo` until the block ends (root only; skips otherwise)."""
    addresses = [f"{SUBNET}.{n}" for n in range(1, count + 1)]
    added: list[str] = []
    try:
        for address in addresses:
            result = _ip("add", address)
            if result.returncode != 0:
                pytest.skip(f"cannot add {address} to lo: {result.stderr.strip()}")
            added.append(address)
        yield addresses
    finally:
        for address in added:
            _ip("del", address)


def _ip(action: str, address: str) -> subprocess.CompletedProcess[str]:
    command = ["ip", "addr", action, f"{address}/32", "dev", "lo"]
    return subprocess.run(command, capture_output=True, text=True, check=False)

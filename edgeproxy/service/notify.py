"""systemd's sd_notify(3): state changes as datagrams to the socket in `NOTIFY_SOCKET`.

The protocol is one datagram of newline-separated `KEY=VALUE` lines; this is all of it that
edgeproxy needs, so no library.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("edgeproxy.service")


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", ...) to systemd; False when not run by it (no socket)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc.strerror or exc)
        return False
    return True


def ready() -> bool:
    return notify("READY=1", "STATUS=serving")


def reloading() -> bool:
    """RELOADING=1 with the time it began, as `Type=notify-reload` requires."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=draining")

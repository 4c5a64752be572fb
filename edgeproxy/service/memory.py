"""Give memory back to the OS once a worker goes quiet after a burst of requests.

After many clients leave at once, their connections' buffers (a blob piece, its ciphertext,
the TLS read buffer: about a MiB each) stay in the process for two reasons: the connection
objects sit in reference cycles that only the cyclic GC frees, and it runs when objects are
allocated, not when a quiet worker waits; and glibc keeps freed pages inside its heap unless
asked to trim. Measured with 100 TLS clients of one worker: 330 MiB held after they left,
164 MiB after a trim alone, 59 MiB (as idle) after a collection and a trim.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable, Iterable

from uvicorn.server import ServerState

QUIET_CHECK = 10.0  # seconds between looks at whether the worker is quiet
# Release only after the resident set grew this much above the lowest a release reached (the
# worker's floor): a full collection of a worker holding many parsed manifests is not free,
# and light traffic leaves nothing to give back. From the floor, not from the last release: a
# release in a gap between requests under load gives back little, and its result must not
# become the mark the memory has to grow past once the load is over (a soak's worker kept
# 174 MiB that way, its floor being 55).
GROWTH = 32 * 1024 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim; None with another C library (musl has none)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


MALLOC_TRIM = _malloc_trim()


def release() -> None:
    """Free what only the cyclic GC can, then hand the heap's free pages back to the OS."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class QuietRelease:
    """Calls `release` when no request is running, some ran since the last look, and the
    resident set is GROWTH above the lowest it was after a release (or at the start)."""

    def __init__(
        self,
        states: Iterable[ServerState],
        release: Callable[[], None] = release,
        resident: Callable[[], int] = resident_bytes,
    ) -> None:
        self._states = list(states)
        self._release = release
        self._resident = resident
        self._requests_seen = self._requests()
        self._floor = resident()

    def _requests(self) -> int:
        return sum(state.total_requests for state in self._states)

    def check(self) -> bool:
        """Release if quiet after work that left memory behind; True if it did."""
        requests = self._requests()
        if requests == self._requests_seen or any(state.tasks for state in self._states):
            return False
        self._requests_seen = requests
        if self._resident() - self._floor < GROWTH:
            return False
        self._release()
        self._floor = min(self._floor, self._resident())
        return True

"""A quiet worker gives the memory of a burst back: a collection, then glibc's trim."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from uvicorn.server import ServerState

from edgeproxy.service.memory import GROWTH, QuietRelease, resident_bytes

MiB = 1024 * 1024


def test_releases_once_quiet_after_requests_that_left_memory_and_only_then() -> None:
    states = [ServerState(), ServerState()]
    resident = [100 * MiB]
    calls: list[int] = []

    def release() -> None:
        calls.append(1)
        resident[0] = 90 * MiB  # what stays after a release: the floor

    quiet = QuietRelease(states, release=release, resident=lambda: resident[0])
    assert not quiet.check()  # no request yet
    states[1].total_requests += 1
    resident[0] = 100 * MiB + GROWTH - 1
    assert not quiet.check()  # quiet after a request, but not enough to give back
    states[1].total_requests += 1
    resident[0] = 100 * MiB + GROWTH
    states[1].tasks.add(object())  # type: ignore[arg-type]  # a request still running
    assert not quiet.check()
    states[1].tasks.clear()
    assert quiet.check()
    assert not quiet.check()  # nothing new since
    states[0].total_requests += 3
    resident[0] = 90 * MiB + GROWTH - 1
    assert not quiet.check()  # measured from the floor, 90
    states[0].total_requests += 3
    resident[0] = 90 * MiB + GROWTH
    assert quiet.check()
    assert calls == [1, 1]


def test_a_release_under_load_does_not_raise_the_mark_for_the_next() -> None:
    """In a gap between requests under load a release gives back little. Once the load is
    over, the memory is still measured from the worker's floor, and given back."""
    state = ServerState()
    resident = [50 * MiB]
    after_release = [166 * MiB]  # under load: most of it is in use

    def release() -> None:
        resident[0] = after_release[0]

    quiet = QuietRelease([state], release=release, resident=lambda: resident[0])
    state.total_requests += 100
    resident[0] = 170 * MiB
    assert quiet.check()  # a gap between requests
    state.total_requests += 100
    resident[0] = 174 * MiB  # the load is over: only 8 MiB above that release's result
    after_release[0] = 55 * MiB
    assert quiet.check()
    assert resident[0] == 55 * MiB


def test_resident_bytes_is_this_process_rss() -> None:
    assert 10 * MiB < resident_bytes() < 4096 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_release_hands_back_buffers_held_in_cycles_and_heap_holes() -> None:
    # In a fresh interpreter: 64 KiB buffers (glibc's heap, not mmap) in reference cycles, a
    # small long-lived allocation after each one so that freeing them leaves holes, not a top
    # glibc would trim by itself. Prints VmRSS in MiB: full, after dropping them, after release.
    script = textwrap.dedent(
        """
        import gc
        from edgeproxy.service.memory import release

        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024

        gc.disable()
        kept, cycles = [], []
        for index in range(3000):
            cycle = [bytearray(64 * 1024)]
            cycle.append(cycle)
            cycles.append(cycle)
            kept.append(bytes(1024) + index.to_bytes(4, "big"))
        full = rss()
        del cycles, cycle
        dropped = rss()
        release()
        print(full, dropped, rss())
        """
    )
    output = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    full, dropped, released = map(int, output.split())
    assert dropped > full - 20  # the cycles still hold their buffers
    assert released < dropped - 150  # about 190 MiB were held

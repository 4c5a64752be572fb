"""SharedCalls: one call per key at a time, its outcome shared, never cancelled by one caller."""

from __future__ import annotations

import asyncio
import functools

import pytest

from edgeproxy.mirror.shared import SharedCalls


def test_callers_that_come_while_a_call_runs_share_it() -> None:
    calls: list[str] = []

    async def main() -> None:
        shared: SharedCalls[str, str] = SharedCalls()
        release = asyncio.Event()

        async def call(key: str) -> str:
            calls.append(key)
            await release.wait()
            return key.upper()

        waiting = [asyncio.ensure_future(shared.run(k, functools.partial(call, k))) for k in "aab"]
        await asyncio.sleep(0)
        release.set()
        assert await asyncio.gather(*waiting) == ["A", "A", "B"]
        assert await shared.run("a", lambda: call("a")) == "A"  # done: a new call

    asyncio.run(main())
    assert calls == ["a", "b", "a"]


def test_a_caller_that_leaves_does_not_cancel_the_call_for_the_others() -> None:
    async def main() -> None:
        shared: SharedCalls[str, int] = SharedCalls()
        release = asyncio.Event()

        async def call() -> int:
            await release.wait()
            return 7

        leaving = asyncio.ensure_future(shared.run("k", call))
        staying = asyncio.ensure_future(shared.run("k", call))
        await asyncio.sleep(0)
        leaving.cancel()
        release.set()
        assert await staying == 7
        with pytest.raises(asyncio.CancelledError):
            await leaving

    asyncio.run(main())


def test_every_caller_gets_the_error() -> None:
    async def main() -> None:
        shared: SharedCalls[str, int] = SharedCalls()

        async def call() -> int:
            await asyncio.sleep(0)
            raise LookupError("gone")

        outcomes = await asyncio.gather(
            *(shared.run("k", call) for _ in range(3)), return_exceptions=True
        )
        assert [type(o) for o in outcomes] == [LookupError] * 3

    asyncio.run(main())

"""Health: registry:2's `health.storagedriver` check, and the upstreams' reachability.

Every `interval` a worker writes a small file in the cache root and reads it back; after
`threshold` failures in a row the storage is down and `/debug/health` answers 503 (a
mirror that cannot store cannot serve). Each upstream's `GET /v2/` is checked as well: any
HTTP answer means reachable; one that is not is reported as degraded, with a 200, because
the cache still serves what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from edgeproxy.config import HealthConfig, UpstreamConfig
from edgeproxy.mirror.eviction import LEFTOVERS_AGE
from edgeproxy.mirror.proxies import Proxies, ProxyTransport
from edgeproxy.mirror.upstream import ssl_context

log = logging.getLogger("edgeproxy.health")

PATH = "/debug/health"
PROBE_PREFIX = ".edgeproxy-health-"  # and the pid: one file per process, removed after each probe


@dataclass
class Check:
    """One checked thing: how many failures in a row, and the last error."""

    failures: int = 0
    error: str | None = None
    checked: float | None = None  # wall-clock time of the last check

    def record(self, error: str | None) -> None:
        self.failures = 0 if error is None else self.failures + 1
        self.error = error
        self.checked = time.time()

    def report(self, down: bool) -> dict[str, Any]:
        status = "down" if down else ("ok" if self.error is None else "failing")
        return {"status": status, "failures": self.failures, "error": self.error}


@dataclass
class HealthMonitor:
    root: Path
    upstreams: list[UpstreamConfig]
    config: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self) -> None:
        self.storage = Check()
        self._stuck: asyncio.Future[None] | None = None  # a storage probe that timed out
        self.reachable = {u.name: Check() for u in self.upstreams}
        self._verify = {u.name: ssl_context(str(u.ca) if u.ca else None) for u in self.upstreams}
        self._proxies = Proxies.from_environment()  # the way out the mirror takes

    @property
    def storage_down(self) -> bool:
        return self.storage.failures >= self.config.threshold

    async def run(self) -> None:
        """Check every `interval` until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.config.interval)

    async def check(self) -> None:
        was_down = self.storage_down
        self.storage.record(await self._probe_storage())
        if self.storage_down != was_down:
            if self.storage_down:
                log.error("storage %s is down: %s", self.root, self.storage.error)
            else:
                log.warning("storage %s is back", self.root)
        results = await asyncio.gather(*(self._probe_upstream(u) for u in self.upstreams))
        for upstream, error in zip(self.upstreams, results, strict=True):
            check = self.reachable[upstream.name]
            if error is not None and check.error is None:
                log.warning("upstream %s unreachable: %s", upstream.name, error)
            elif error is None and check.error is not None:
                log.warning("upstream %s reachable again", upstream.name)
            check.record(error)

    async def _probe_storage(self) -> str | None:
        # A probe that timed out still holds its thread, one of the few the warm reads share:
        # no other starts until it returns, or hung writes would take them all.
        if self._stuck is not None and not self._stuck.done():
            return "the last probe has not returned"
        probe = asyncio.ensure_future(asyncio.to_thread(self._write_and_read))
        probe.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved
        try:
            await asyncio.wait_for(asyncio.shield(probe), self.config.timeout)
        except TimeoutError:
            self._stuck = probe
            return f"no answer within {self.config.timeout:g}s"
        except OSError as exc:
            return f"{exc.strerror or exc}"
        return None

    def _write_and_read(self) -> None:
        path = self.root / f"{PROBE_PREFIX}{os.getpid()}"
        payload = secrets.token_bytes(16)
        try:
            path.write_bytes(payload)
            if path.read_bytes() != payload:
                raise OSError("read back different bytes")
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        self._sweep(time.time() - LEFTOVERS_AGE)

    def _sweep(self, before: float) -> None:
        """Remove the probe files of processes killed mid-probe (SIGKILL, the OOM killer). By
        age, not by pid: pids are reused, and in another container name another process."""
        with contextlib.suppress(OSError):
            for path in self.root.glob(f"{PROBE_PREFIX}*"):
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < before:
                        path.unlink()

    async def _probe_upstream(self, upstream: UpstreamConfig) -> str | None:
        verify = self._verify[upstream.name]
        try:
            # An https:// proxy's certificate, checked as the upstream's: with the same context
            # (a probe speaks HTTP/1.1 only, so both connections offer the same ALPN on it).
            transport = ProxyTransport(self._proxies, lambda: verify, verify=verify)
            client = httpx.AsyncClient(
                transport=transport, trust_env=False, timeout=self.config.timeout
            )
            async with client:
                response = await client.get(f"{upstream.base_url}/v2/")
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if response.status_code >= 500:
            return f"answered {response.status_code}"
        return None

    def report(self) -> tuple[int, dict[str, Any]]:
        """The status code and the JSON document of `/debug/health`."""
        degraded = any(check.error is not None for check in self.reachable.values())
        status = "down" if self.storage_down else ("degraded" if degraded else "ok")
        document = {
            "status": status,
            "storage": self.storage.report(self.storage_down),
            "upstreams": {
                name: check.report(check.error is not None)
                for name, check in self.reachable.items()
            },
        }
        return (503 if self.storage_down else 200), document

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, document = self.report()
        body = json.dumps(document).encode()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

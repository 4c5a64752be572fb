"""Prometheus metrics (prometheus-client), added up over every worker process.

The master gives every worker the same `PROMETHEUS_MULTIPROC_DIR` before it starts them;
prometheus-client keeps each process's values in a file there, and `/metrics` (on the
`[metrics] listen` listener, served by any worker) sums them. The registry:2 names
(`registry_proxy_requests_total{type="blob"|"manifest"}`, `_hits`, `_misses`,
`_pulled_bytes`, `_pushed_bytes`) mean what they mean there; the rest are `edgeproxy_*`.

Nothing is counted until `enable()` runs in a worker: the hooks below are free no-ops in
tests and tools that import the mirror without serving it.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from edgeproxy.logs import Answer
from edgeproxy.mirror.cache_status import cache_state
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.names import parse_route

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

    from edgeproxy.mirror.storage import Storage

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_TYPES = {"blobs": "blob", "manifests": "manifest"}  # registry:2's `type` label


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        def proxy(name: str, doc: str) -> Counter:
            return Counter(f"registry_proxy_{name}", doc, ["type"])

        self.requests = Counter(
            "edgeproxy_http_requests", "Mirror requests by route and status",
            ["route", "method", "status"],
        )  # fmt: skip
        self.served_bytes = Counter(
            "edgeproxy_http_response_bytes", "Body bytes sent to clients by route", ["route"]
        )
        self.proxy_requests = proxy("requests", "Blob/manifest requests received")
        self.hits = proxy("hits", "Blob/manifest requests served from the cache")
        self.misses = proxy("misses", "Blob/manifest requests fetched from the upstream")
        self.pulled = proxy("pulled_bytes", "Bytes pulled from the upstream")
        self.pushed = proxy("pushed_bytes", "Bytes pushed to clients")
        self.stale = Counter(
            "edgeproxy_cache_stale", "Requests served stale (upstream down)", ["type"]
        )
        self.fetches = Gauge(
            "edgeproxy_upstream_fetches_in_flight", "Blob downloads from the upstream running",
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.cache_size: Gauge = Gauge(
            "edgeproxy_cache_size_bytes", "Bytes of blobs in the cache",
            multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.evictions = Counter("edgeproxy_cache_evictions", "Entries evicted", ["type"])
        self.evicted_bytes = Counter(
            "edgeproxy_cache_evicted_bytes", "Bytes evicted from the cache", ["type"]
        )
        for kind in _TYPES.values():  # present from the start, as registry:2 does
            for counter in (self.proxy_requests, self.hits, self.misses, self.pulled):
                counter.labels(kind).inc(0)
            self.pushed.labels(kind).inc(0)


_metrics: _Metrics | None = None


def enable() -> None:
    """Start counting in this process (a worker, after `PROMETHEUS_MULTIPROC_DIR` is set)."""
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()


def pulled(kind: str, size: int) -> None:
    """`size` bytes of a "blob" or "manifest" came from the upstream into the cache."""
    if _metrics is not None:
        _metrics.pulled.labels(kind).inc(size)


def fetch_started() -> None:
    if _metrics is not None:
        _metrics.fetches.inc()


def fetch_ended(pulled: int = 0) -> None:
    """A blob download ended: `pulled` bytes are in the cache (0: it failed)."""
    if _metrics is not None:
        _metrics.fetches.dec()
        _metrics.pulled.labels("blob").inc(pulled)


def evicted(kind: str, count: int = 1, size: int = 0) -> None:
    """For the cache's eviction: `count` entries of `kind` ("blob", "manifest") removed."""
    if _metrics is not None:
        _metrics.evictions.labels(kind).inc(count)
        _metrics.evicted_bytes.labels(kind).inc(size)


class RequestMetrics:
    """ASGI middleware around the mirror: counts each request by its route and status, the
    body bytes sent, and hits/misses/stale from the mirror's own `Cache-Status`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _metrics is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = _metrics
        route = _route(scope["path"])
        answer = Answer(send)
        try:
            await self.app(scope, receive, answer.send)
        finally:
            status, sent = answer.status, answer.sent
            metrics.requests.labels(route, scope["method"], str(status or "cut")).inc()
            metrics.served_bytes.labels(route).inc(sent)
            kind = _TYPES.get(route)
            if kind is not None and 200 <= status < 300:
                metrics.proxy_requests.labels(kind).inc()
                metrics.pushed.labels(kind).inc(sent)
                state = cache_state(answer.cache_status)
                if state in ("HIT", "STALE", "REVALIDATED"):  # registry:2 counts them as hits
                    metrics.hits.labels(kind).inc()
                elif state == "MISS":
                    metrics.misses.labels(kind).inc()
                if state == "STALE":
                    metrics.stale.labels(kind).inc()


def _route(path: str) -> str:
    try:
        route = parse_route(path)
    except RegistryError:
        return "invalid"
    return route.kind if route is not None else "other"


def metrics_app(storage: Storage | None) -> ASGIApp:
    """`/metrics` for every worker's values; with the cache's `storage`, its size measured at
    each scrape (points-to mode has no cache)."""
    from prometheus_client import CollectorRegistry, make_asgi_app, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    exposition = make_asgi_app(registry)

    def cache_size() -> int:
        assert storage is not None
        return sum(blob.size for blob in storage.blobs())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if _metrics is not None and storage is not None:
            _metrics.cache_size.set(await asyncio.to_thread(cache_size))
        await exposition(scope, receive, send)

    return app


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: a total never goes down)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

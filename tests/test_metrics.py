"""Prometheus metrics over two workers: a cold then a warm skopeo pull through the real
registry move registry:2's proxy counters and edgeproxy's own as they should."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.images import Pushed
from tests.support.ports import free_port
from tests.support.registry import Registry
from tests.support.servers import EdgeproxyProcess, write_toml
from tests.support.skopeo import skopeo

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=30).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def proxy(samples: Samples, name: str, kind: str) -> float:
    return value(samples, f"registry_proxy_{name}_total", type=kind)


def test_counters_after_a_cold_and_a_warm_pull(
    registry_none: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    item = push_all(registry_none)["multi"]
    image = item.image
    assert image.config_digest is not None
    blobs = [image.config_digest, *image.layer_digests]
    blob_bytes = sum(image.blob_path(d).stat().st_size for d in blobs)
    port, metrics_port = free_port(), free_port()
    config = {
        "mirror": {
            "root": str(tmp_path / "cache"),
            "listen": f"127.0.0.1:{port}",
            "upstream": [{"name": "docker.io", "url": registry_none.url}],
        },
        "edge": {"http": f"127.0.0.1:{free_port()}", "workers": 2},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }
    process = EdgeproxyProcess(write_toml(tmp_path / "proxy.toml", config), port)
    process.start()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        before = scrape(url)
        for kind in ("blob", "manifest"):  # registry:2's series exist from the start
            for name in ("requests", "hits", "misses", "pulled_bytes", "pushed_bytes"):
                assert (f"registry_proxy_{name}_total", frozenset({("type", kind)})) in before
        rounds = []
        for round_name in ("cold", "warm"):
            skopeo(
                "copy", "--src-tls-verify=false", "--src-no-creds", "--preserve-digests",
                f"docker://{process.host}/{item.repo}:{item.tag}",
                f"oci:{tmp_path / round_name}:v1",
            )  # fmt: skip
            rounds.append(scrape(url))
        cold, warm = rounds
    finally:
        process.stop()

    n = len(blobs)
    # Cold: every blob a miss, fetched once, its bytes pulled and pushed.
    assert proxy(cold, "misses", "blob") == n
    assert proxy(cold, "hits", "blob") == 0
    assert proxy(cold, "requests", "blob") == n
    assert proxy(cold, "pulled_bytes", "blob") == blob_bytes
    assert proxy(cold, "pushed_bytes", "blob") == blob_bytes
    assert proxy(cold, "misses", "manifest") >= 1
    assert proxy(cold, "pulled_bytes", "manifest") >= len(
        image.blob_path(image.manifest_digest).read_bytes()
    )
    # Warm: every blob a hit, nothing more pulled; the tag revalidated (a hit), not refetched.
    assert proxy(warm, "hits", "blob") == n
    assert proxy(warm, "misses", "blob") == n
    assert proxy(warm, "pulled_bytes", "blob") == blob_bytes
    assert proxy(warm, "pushed_bytes", "blob") == 2 * blob_bytes
    assert proxy(warm, "misses", "manifest") == proxy(cold, "misses", "manifest")
    assert proxy(warm, "hits", "manifest") > proxy(cold, "hits", "manifest")
    assert proxy(warm, "pulled_bytes", "manifest") == proxy(cold, "pulled_bytes", "manifest")
    # edgeproxy's own: requests by route and status, bytes served, fetches, cache size.
    gets = value(warm, "edgeproxy_http_requests_total", route="blobs", method="GET", status="200")
    assert gets == 2 * n
    assert value(warm, "edgeproxy_http_response_bytes_total", route="blobs") == 2 * blob_bytes
    assert value(warm, "edgeproxy_upstream_fetches_in_flight") == 0
    assert value(warm, "edgeproxy_cache_size_bytes") >= blob_bytes
    assert value(warm, "edgeproxy_cache_evictions_total", type="blob") == 0

"""Real clients through the TLS edge, trusting the test CA (`edgeproxy certs self-signed`):
skopeo pushes and pulls an image with a 1 GiB layer through edgeproxy pointing to a private
registry:2 and pulls it through the embedded mirror of that registry; podman and containerd
pull through the edge's embedded mirror with the CA from a directory of their own."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.edge import Edge, ca_dir, run_edge
from tests.support.images import CHUNK, Image, RandomLayer, build_image, push, random_layer
from tests.support.podman import mirror_env
from tests.support.registry import Registry, start_registry
from tests.support.skopeo import skopeo

pytestmark = pytest.mark.e2e

OFFLINE_UPSTREAM = {"name": "docker.io", "url": "http://127.0.0.1:1"}
# skopeo uploads a layer in one chunked PATCH, which the seed's client_max_body_size 1024m
# bounds (nginx and edgeproxy answer 413 past it): the layer is as large as fits, 1 GiB less
# 1 MiB of data (its gzip and tar framing stay under the MiB).
LAYER_DATA = (1 << 30) - (1 << 20)


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """An image with a small layer and a 1 GiB one (streamed to disk, ~10 s here)."""
    layout = tmp_path_factory.mktemp("big") / "layout"
    layers: list[bytes | RandomLayer] = [random_layer(1024, seed=60), RandomLayer(LAYER_DATA, 61)]
    image = build_image(layout, "v1", layers)
    assert image.blob_path(image.layer_digests[1]).stat().st_size <= 1 << 30
    yield image
    for blob in (layout / "blobs" / "sha256").iterdir():  # 1 GiB of /tmp back at once
        blob.unlink()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def copy(source: str, destination: str, *flags: str) -> float:
    """`skopeo copy` with digests preserved; the seconds it took."""
    began = time.monotonic()
    skopeo("copy", "--preserve-digests", *flags, source, destination, timeout=600)
    return time.monotonic() - began


def assert_pulled(layout: Path, image: Image) -> None:
    """The pulled layout holds the image: same manifest digest, every layer's bytes hash to
    its digest (skopeo checks too; this reads the 1 GiB file once more); then frees it."""
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    for digest in image.layer_digests:
        blob = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
        assert sha256_of(blob) == digest
    for blob in (layout / "blobs" / "sha256").iterdir():
        blob.unlink()


def test_1gib_push_and_pulls_through_the_tls_edge(big_image: Image, tmp_path: Path) -> None:
    registry = start_registry(tmp_path / "private")
    seconds: dict[str, float] = {}
    try:
        with run_edge(tmp_path / "edge", [OFFLINE_UPSTREAM], backend=registry.url) as edge:
            assert edge.certificate is not None
            certs = str(ca_dir(edge.certificate, tmp_path / "ca"))
            reference = f"docker://{edge.https_host}/private/big:v1"
            seconds["push, points-to"] = copy(
                f"oci:{big_image.layout}:v1", reference, "--dest-cert-dir", certs, "--dest-no-creds"
            )
            seconds["pull, points-to"] = copy(
                reference,
                f"oci:{tmp_path / 'pulled'}:v1",
                "--src-cert-dir",
                certs,
                "--src-no-creds",
            )
            assert_pulled(tmp_path / "pulled", big_image)
            # The registry got the 1 GiB through the edge, not around it.
            big = big_image.layer_digests[1]
            assert registry.wait_count("PUT", "/manifests/v1", 1) == 1
            assert registry.count("GET", f"/blobs/{big}") == 1
        mirror = {"name": "docker.io", "url": registry.url}
        with run_edge(tmp_path / "mirror", [mirror]) as edge:
            assert edge.certificate is not None
            certs = str(ca_dir(edge.certificate, tmp_path / "mirror-ca"))
            seconds["pull, embedded mirror (cold)"] = copy(
                f"docker://{edge.https_host}/private/big:v1",
                f"oci:{tmp_path / 'mirrored'}:v1",
                "--src-cert-dir",
                certs,
                "--src-no-creds",
            )
            assert_pulled(tmp_path / "mirrored", big_image)
            assert registry.wait_count("GET", f"/blobs/{big}", 2) == 2  # fetched once more
    finally:
        registry.close()
    print("1 GiB image through the TLS edge:", {k: round(v, 1) for k, v in seconds.items()})


@pytest.fixture
def tls_mirror(registry_none: Registry, tmp_path: Path) -> Iterator[tuple[Edge, Path]]:
    """The edge (TLS, embedded mirror of `registry_none`) and a directory with its CA."""
    with run_edge(tmp_path / "edge", [{"name": "docker.io", "url": registry_none.url}]) as edge:
        assert edge.certificate is not None
        yield edge, ca_dir(edge.certificate, tmp_path / "ca")


def pushed_small(registry: Registry, tmp_path: Path, repo: str, seed: int) -> Image:
    image = build_image(tmp_path / "image", "v1", [random_layer(250_000, seed=seed)])
    push(image, registry, repo, "v1")
    return image


def run(command: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def test_podman_pulls_through_the_tls_edge(
    registry_none: Registry, tls_mirror: tuple[Edge, Path], tmp_path: Path, podman: list[str]
) -> None:
    edge, certs = tls_mirror
    image = pushed_small(registry_none, tmp_path, "test/podman-tls", seed=62)
    # No `insecure`: the mirror is verified with the CA.
    env = mirror_env(tmp_path / "registries.conf", edge.https_host, insecure=False)
    # Without the CA the edge's certificate is refused: the CA is what makes the pull work.
    untrusted = subprocess.run(
        [*podman, "pull", f"{edge.https_host}/test/podman-tls:v1"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert untrusted.returncode != 0 and "certificate" in untrusted.stderr
    run([*podman, "pull", "--cert-dir", str(certs), "docker.io/test/podman-tls:v1"], env)
    digests = run([*podman, "images", "--digests", "--format", "{{.Digest}}"], env)
    assert image.manifest_digest in digests
    requests = [line for line in edge.access_lines() if image.layer_digests[0] in line]
    assert requests and all(" TLSv1." in line for line in requests)


def test_containerd_pulls_through_the_tls_edge(
    registry_none: Registry,
    tls_mirror: tuple[Edge, Path],
    tmp_path: Path,
    containerd: Path,
) -> None:
    edge, certs = tls_mirror
    image = pushed_small(registry_none, tmp_path, "test/ctr-tls", seed=63)
    hosts = tmp_path / "hosts" / "docker.io"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n'
        f'[host."https://{edge.https_host}"]\n  capabilities = ["pull", "resolve"]\n'
        f'  ca = "{certs / "ca.crt"}"\n'
    )
    run([
        "ctr", "--address", str(containerd), "images", "pull",
        "--hosts-dir", str(tmp_path / "hosts"), "docker.io/test/ctr-tls:v1",
    ])  # fmt: skip
    requests = [line for line in edge.access_lines() if image.layer_digests[0] in line]
    assert requests and all(" TLSv1." in line for line in requests)

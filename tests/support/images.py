"""Build OCI image layouts in pure Python and push them with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import secrets
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.registry import Registry
from tests.support.skopeo import creds_args, skopeo

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
EPOCH = "1970-01-01T00:00:00Z"
CHUNK = 1 << 20


@dataclass(frozen=True)
class RandomLayer:
    """A layer streamed to disk: the bytes of `random_layer(size, seed)`, never all in memory."""

    size: int
    seed: int


@dataclass
class Image:
    """What was built into an OCI layout."""

    layout: Path
    tag: str  # the ref name in index.json (for an index's children: the index's)
    manifest_digest: str
    media_type: str  # MT_MANIFEST or MT_INDEX
    layer_digests: list[str]  # for an index: all children's layers
    config_digest: str | None  # None for an index
    children: list[Image] = field(default_factory=list)  # for an index: one image per platform

    def blob_path(self, digest: str) -> Path:
        """Where a blob of this image is stored in the layout."""
        algorithm, _, hexdigest = digest.partition(":")
        return self.layout / "blobs" / algorithm / hexdigest


@dataclass(frozen=True)
class Pushed:
    """An image pushed as repo:tag."""

    repo: str
    tag: str
    image: Image


class _BlobWriter:
    """Streams bytes into a new blob of a layout; `finish()` names it by its digest."""

    def __init__(self, layout: Path) -> None:
        self._dir = layout / "blobs" / "sha256"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._tmp = self._dir / f".tmp-{secrets.token_hex(8)}"
        self._file = self._tmp.open("wb")
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)
        self._size += len(data)

    def finish(self) -> tuple[str, int]:
        """Close the blob; return (digest, size)."""
        self._file.close()
        self._tmp.replace(self._dir / self._hash.hexdigest())
        return f"sha256:{self._hash.hexdigest()}", self._size


def _write_random_layer(write: Callable[[bytes], object], size: int, seed: int) -> str:
    """Write a gzipped tar holding one file of `size` seeded random bytes; return its diff_id.

    The gzip stream uses stored blocks (level 0): random data does not compress, and building
    a 1 GiB layer stays fast.
    """
    diff = hashlib.sha256()
    gz = zlib.compressobj(0, zlib.DEFLATED, 31)

    def emit(chunk: bytes) -> None:
        diff.update(chunk)
        write(gz.compress(chunk))

    info = tarfile.TarInfo(f"layer-{seed}.bin")
    info.size, info.mode, info.mtime = size, 0o644, 0
    emit(info.tobuf())
    rng = random.Random(seed)
    for offset in range(0, size, CHUNK):
        emit(rng.randbytes(min(CHUNK, size - offset)))
    emit(b"\0" * (-size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE))
    write(gz.flush())
    return f"sha256:{diff.hexdigest()}"


def random_layer(size: int, seed: int) -> bytes:
    """A gzipped tar holding one file of `size` pseudo-random bytes, deterministic from `seed`."""
    buffer = io.BytesIO()
    _write_random_layer(buffer.write, size, seed)
    return buffer.getvalue()


def files_layer(files: Mapping[str, bytes], mode: int = 0o755) -> bytes:
    """A gzipped tar of `files` (path in the image -> content), owned by root, dated 1970."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)


def shell_layer() -> bytes:
    """The host's dash as /bin/sh with the libraries `ldd` says it loads: enough of an image
    for `docker run IMAGE /bin/sh -c ...` (no compiler, no download)."""
    dash = Path(shutil.which("dash") or "/bin/dash")
    listing = subprocess.run(["ldd", str(dash)], capture_output=True, text=True, check=True)
    files = {"/bin/sh": dash.read_bytes()}
    for line in listing.stdout.splitlines():  # "libc.so.6 => /lib/.../libc.so.6 (0x...)"
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            files[path] = Path(path).read_bytes()  # the loader's own path, as dash names it
    return files_layer(files)


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    writer = _BlobWriter(layout)
    writer.write(data)
    return writer.finish()


def _write_json(layout: Path, media_type: str, document: dict[str, Any]) -> dict[str, Any]:
    """Store a JSON document as a blob; return its descriptor."""
    digest, size = _write_blob(layout, json.dumps(document, separators=(",", ":")).encode())
    return {"mediaType": media_type, "digest": digest, "size": size}


def _write_layer(layout: Path, layer: bytes | RandomLayer) -> tuple[dict[str, Any], str]:
    """Store a layer; return its descriptor and diff_id."""
    if isinstance(layer, RandomLayer):
        writer = _BlobWriter(layout)
        diff_id = _write_random_layer(writer.write, layer.size, layer.seed)
        digest, size = writer.finish()
    else:
        if not layer.startswith(b"\x1f\x8b"):
            raise ValueError("layers must be gzipped tars (skopeo would compress a plain tar)")
        diff_id = f"sha256:{hashlib.sha256(gzip.decompress(layer)).hexdigest()}"
        digest, size = _write_blob(layout, layer)
    return {"mediaType": MT_LAYER_GZIP, "digest": digest, "size": size}, diff_id


def _write_manifest(
    layout: Path, tag: str, layers: Sequence[bytes | RandomLayer], arch: str, os_name: str
) -> tuple[Image, dict[str, Any]]:
    """Store layers, config and manifest (untagged); return the image and its descriptor."""
    written = [_write_layer(layout, layer) for layer in layers]
    config = {
        "created": EPOCH,
        "architecture": arch,
        "os": os_name,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in written]},
        "history": [
            {"created": EPOCH, "created_by": f"edgeproxy test layer {i}"}
            for i in range(len(written))
        ],
    }
    config_descriptor = _write_json(layout, MT_CONFIG, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config_descriptor,
        "layers": [descriptor for descriptor, _ in written],
    }
    descriptor = _write_json(layout, MT_MANIFEST, manifest)
    image = Image(
        layout=layout,
        tag=tag,
        manifest_digest=descriptor["digest"],
        media_type=MT_MANIFEST,
        layer_digests=[d["digest"] for d, _ in written],
        config_digest=config_descriptor["digest"],
    )
    return image, descriptor


def _tag(layout: Path, tag: str, descriptor: dict[str, Any]) -> None:
    """Write `oci-layout` and point `tag` in index.json at `descriptor` (other tags kept)."""
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index_path = layout / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ] + [{**descriptor, "annotations": {REF_NAME: tag}}]
    index_path.write_text(json.dumps(index, indent=2))


def build_image(
    layout: Path,
    tag: str,
    layers: Sequence[bytes | RandomLayer],
    *,
    arch: str = "amd64",
    os: str = "linux",
) -> Image:
    """Build a single-platform OCI image into `layout` (created or added to) as `tag`.

    `layers` are gzipped tars (see `random_layer`) or `RandomLayer` specs streamed to disk.
    """
    image, descriptor = _write_manifest(layout, tag, layers, arch, os)
    _tag(layout, tag, descriptor)
    return image


def build_index(
    layout: Path,
    tag: str,
    platforms: list[tuple[str, str]],
    layers_per_platform: int = 1,
    *,
    layer_size: int = 4096,
    seed: int = 0,
) -> Image:
    """Build an OCI image index with one image per (os, arch), each with its own random layers."""
    children = []
    entries = []
    for i, (os_name, arch) in enumerate(platforms):
        layers = [
            random_layer(layer_size, seed + i * layers_per_platform + j)
            for j in range(layers_per_platform)
        ]
        child, descriptor = _write_manifest(layout, tag, layers, arch, os_name)
        children.append(child)
        entries.append({**descriptor, "platform": {"architecture": arch, "os": os_name}})
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}
    descriptor = _write_json(layout, MT_INDEX, index)
    _tag(layout, tag, descriptor)
    return Image(
        layout=layout,
        tag=tag,
        manifest_digest=descriptor["digest"],
        media_type=MT_INDEX,
        layer_digests=[digest for child in children for digest in child.layer_digests],
        config_digest=None,
        children=children,
    )


def push(
    image: Image,
    registry: Registry,
    repo: str,
    tag: str | None = None,
    *,
    anonymous: bool = False,
) -> Pushed:
    """Push `image` (all platforms, digests preserved) to `registry` as repo:tag."""
    tag = tag or image.tag
    skopeo(
        "copy",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        *creds_args("dest-", None if anonymous else registry.creds),
        f"oci:{image.layout}:{image.tag}",
        f"docker://{registry.host}/{repo}:{tag}",
    )
    return Pushed(repo=repo, tag=tag, image=image)

"""Manifests: served byte for byte from the cache, tags revalidated with the upstream.

A digest reference is immutable: once cached it never needs the upstream. A tag is trusted
for the upstream's `tag_ttl`, then confirmed with a HEAD; when the upstream fails, the
cached tag is served stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeproxy import metrics
from edgeproxy.mirror.cache_status import HIT, MISS, REVALIDATED, STALE
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.names import Target, is_digest
from edgeproxy.mirror.shared import SharedCalls
from edgeproxy.mirror.storage import Storage
from edgeproxy.mirror.upstream import UpstreamClient, UpstreamResponse, UpstreamUnavailable

log = logging.getLogger("edgeproxy.manifests")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# Asked for when the client names none, so that the upstream never converts to schema 1.
DEFAULT_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

# RFC 6838's type/subtype: the declared mediaType becomes the Content-Type header.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][\w!#$&^.+-]{0,126}/[A-Za-z0-9][\w!#$&^.+-]{0,126}", re.ASCII)

MEMORY_BYTES = 32 * 1024 * 1024  # parsed manifests kept in memory, per process


@dataclass(frozen=True)
class Manifest:
    data: bytes
    digest: str
    media_type: str


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def media_type_of(data: bytes) -> str:
    """The media type a manifest declares, or the one its shape implies (as registry:2 does)."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
        raise RegistryError("MANIFEST_INVALID", "manifest is not JSON") from exc
    if not isinstance(document, dict):
        raise RegistryError("MANIFEST_INVALID", "manifest is not a JSON object")
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        if not _MEDIA_TYPE.fullmatch(declared):
            raise RegistryError("MANIFEST_INVALID", "manifest declares an invalid mediaType")
        return declared
    if document.get("schemaVersion") == 1:
        return DOCKER_V1_SIGNED
    return OCI_INDEX if "manifests" in document else OCI_MANIFEST


def acceptable(media_type: str, accept: str | None) -> bool:
    if not accept:
        return True
    kinds = {part.split(";")[0].strip() for part in accept.split(",")}
    return bool(kinds & {media_type, "*/*", "application/*"})


class ManifestService:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        # Manifests are immutable by digest: keep the hot ones parsed, in memory.
        self._memory: OrderedDict[tuple[str, str], Manifest] = OrderedDict()
        # One upstream GET per digest at a time: a cold image's clients share it (Docker Hub
        # counts each manifest GET against the pull rate limit).
        self._fetches: SharedCalls[tuple[str, str], Manifest] = SharedCalls()
        # One HEAD per tag at a time: clients that ask while it is out take its answer (the
        # CI runners that all start `FROM python:3.12` at once cost one HEAD, not hundreds).
        self._revalidations: SharedCalls[tuple[str, str, str, str], str | None] = SharedCalls()
        self._memory_bytes = 0

    def _cached(self, target: Target, digest: str) -> Manifest | None:
        key = (target.local_name, digest)
        manifest = self._memory.get(key)
        if manifest is not None:
            self._memory.move_to_end(key)
            return manifest
        data = self._storage.read_manifest(target.local_name, digest)
        if data is None:
            return None
        manifest = Manifest(data, digest, media_type_of(data))
        self._remember(key, manifest)
        return manifest

    def _remember(self, key: tuple[str, str], manifest: Manifest) -> None:
        if key in self._memory:  # fetched again meanwhile: the same bytes
            self._memory.move_to_end(key)
            return
        self._memory[key] = manifest
        self._memory_bytes += len(manifest.data)
        while self._memory_bytes > MEMORY_BYTES:
            _, dropped = self._memory.popitem(last=False)
            self._memory_bytes -= len(dropped.data)

    async def get(
        self, upstream: UpstreamClient, target: Target, reference: str, accept: str | None
    ) -> tuple[Manifest, str]:
        """The manifest and the Cache-Status saying how it was obtained."""
        if is_digest(reference):
            cached = self._cached(target, reference)
            if cached is not None:
                return cached, HIT
            return await self._fetch(upstream, target, reference, accept), MISS
        return await self._get_tag(upstream, target, reference, accept)

    async def _get_tag(
        self, upstream: UpstreamClient, target: Target, tag: str, accept: str | None
    ) -> tuple[Manifest, str]:
        known = self._storage.read_tag(target.local_name, tag)
        cached = self._cached(target, known[0]) if known else None
        fresh = known is not None and time.time() - known[1] < target.upstream.tag_ttl
        if cached is not None and fresh and acceptable(cached.media_type, accept):
            return cached, HIT
        try:
            digest = await self._revalidations.run(
                (upstream.name, target.remote_name, tag, accept or ""),
                lambda: _tag_digest(upstream, target, tag, accept),
            )
            # The tag's digest may be cached already (the same tag before, another tag).
            manifest = self._cached(target, digest) if digest else None
            status = REVALIDATED
            if manifest is None:
                manifest, status = await self._fetch(upstream, target, digest or tag, accept), MISS
        except RegistryError as exc:
            if cached is not None and _may_serve_stale(exc):
                log.warning("serving %s:%s stale: %s", target.local_name, tag, exc.message)
                return cached, STALE
            raise
        if _sees_lists(accept):
            _keep(f"tag {tag}", self._storage.write_tag, target.local_name, tag, manifest.digest)
        return manifest, status

    async def _fetch(
        self, upstream: UpstreamClient, target: Target, reference: str, accept: str | None
    ) -> Manifest:
        """The running fetch of a digest, or a new one; a tag is fetched on its own."""
        if not is_digest(reference):
            return await self._fetch_once(upstream, target, reference, accept)
        return await self._fetches.run(
            (target.local_name, reference),
            lambda: self._fetch_once(upstream, target, reference, accept),
        )

    async def _fetch_once(
        self, upstream: UpstreamClient, target: Target, reference: str, accept: str | None
    ) -> Manifest:
        """GET from the upstream, verify the bytes against the digest, store."""
        response = await _ask(upstream, "GET", target, reference, accept)
        digest = sha256_digest(response.body)
        expected = reference if is_digest(reference) else None
        expected = expected or response.headers.get("docker-content-digest")
        if expected and expected != digest:
            log.error(
                "upstream %s sent %s for %s (digest %s): not cached",
                upstream.name,
                target.remote_name,
                expected,
                digest,
            )
            raise UpstreamUnavailable(upstream.name, f"manifest bytes do not match {expected}")
        media_type = media_type_of(response.body)
        _keep(digest, self._storage.write_manifest, target.local_name, digest, response.body)
        metrics.pulled("manifest", len(response.body))
        manifest = Manifest(response.body, digest, media_type)
        self._remember((target.local_name, digest), manifest)
        return manifest


def _sees_lists(accept: str | None) -> bool:
    """Whether a client's Accept lets the upstream answer a tag with what it points to. To one
    that takes no list, registries answer a multi-platform tag with its linux/amd64 manifest:
    that answer must not become the tag for every other client."""
    return acceptable(OCI_INDEX, accept) or acceptable(DOCKER_LIST, accept)


async def _tag_digest(
    upstream: UpstreamClient, target: Target, tag: str, accept: str | None
) -> str | None:
    """The digest the upstream's tag points to now (HEAD), if the upstream says."""
    head = await _ask(upstream, "HEAD", target, tag, accept)
    digest: str | None = head.headers.get("docker-content-digest")
    return digest


async def _ask(
    upstream: UpstreamClient, method: str, target: Target, reference: str, accept: str | None
) -> UpstreamResponse:
    """A manifest HEAD or GET upstream; anything but a 200 becomes the client's error."""
    response = await upstream.request(
        method,
        f"/v2/{target.remote_name}/manifests/{reference}",
        target.remote_name,
        headers={"Accept": accept or DEFAULT_ACCEPT},
    )
    if response.status != 200:
        retry_after = response.headers.get("retry-after")
        raise upstream.error(response.status, "MANIFEST_UNKNOWN", retry_after)
    return response


def _keep(what: str, write: Callable[[str, str, Any], None], *args: Any) -> None:
    """Cache a manifest or a tag if the disk lets us (it may be full); serve it either way."""
    try:
        write(*args)
    except OSError as exc:
        log.warning("not cached: %s: %s", what, exc)


def _may_serve_stale(error: RegistryError) -> bool:
    return isinstance(error, UpstreamUnavailable) or error.code == "TOOMANYREQUESTS"

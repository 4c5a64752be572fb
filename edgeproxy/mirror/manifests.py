"""Manifests: served byte for byte from the cache, tags revalidated with the upstream.

A digest reference is immutable: once cached it never needs the upstream. A tag is trusted
for the upstream's `tag_ttl`, then confirmed with a HEAD (a GET where the HEAD cannot tell);
when the upstream fails or refuses (down, 5xx, 4xx, or the tag is gone), the cached tag is
served stale. As in registry:2's proxy, the upstream is always asked for every manifest type
(it answers with what it stores) and each client's Accept is met here.
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
from edgeproxy.mirror.eviction import Evictor
from edgeproxy.mirror.names import Target, check_digest, is_digest
from edgeproxy.mirror.shared import SharedCalls
from edgeproxy.mirror.storage import Storage
from edgeproxy.mirror.upstream import (
    UpstreamClient,
    UpstreamResponse,
    UpstreamUnavailable,
    is_refusal,
)

log = logging.getLogger("edgeproxy.manifests")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# What the upstream is asked for: every type, so that it never converts to schema 1.
UPSTREAM_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

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


class ManifestService:
    def __init__(self, storage: Storage, evictor: Evictor | None = None) -> None:
        self._storage = storage
        self._evictor = evictor  # told of a full disk: it may pass early
        # Manifests are immutable by digest: keep the hot ones parsed, in memory.
        self._memory: OrderedDict[tuple[str, str], Manifest] = OrderedDict()
        # One upstream GET per digest at a time: a cold image's clients share it (Docker Hub
        # counts each manifest GET against the pull rate limit).
        self._fetches: SharedCalls[tuple[str, str], Manifest] = SharedCalls()
        # One HEAD per tag at a time: clients that ask while it is out take its answer (the
        # CI runners that all start `FROM python:3.12` at once cost one HEAD, not hundreds).
        self._revalidations: SharedCalls[tuple[str, str, str], str | None] = SharedCalls()
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
        if sha256_digest(data) != digest:
            # Small files are renamed into place without an fsync (as registry:2 writes them):
            # a power cut may leave one empty or cut. Fetched again, and written over.
            log.warning("%s@%s: the stored bytes are not the digest's", target.local_name, digest)
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
        self, upstream: UpstreamClient, target: Target, reference: str
    ) -> tuple[Manifest, str]:
        """The manifest as the upstream stores it, and the Cache-Status saying how it was
        obtained."""
        if is_digest(reference):
            cached = self._cached(target, reference)
            if cached is not None:
                return cached, HIT
            return await self._fetch(upstream, target, reference), MISS
        return await self._get_tag(upstream, target, reference)

    async def negotiate(
        self,
        upstream: UpstreamClient,
        target: Target,
        reference: str,
        found: tuple[Manifest, str],
        accept: str | None,
    ) -> Manifest:
        """What a client whose Accept is `accept` gets of the manifest `found` (with its
        Cache-Status) for `reference`, as registry:2's handler chooses: an OCI manifest or
        index only to a client that names its type, and for a tag of a Docker manifest list,
        to a client that takes no list, its linux/amd64 manifest (registry:2 2.8 would then
        rewrite schema 2 to schema 1 for a client that takes no schema 2; edgeproxy serves
        schema 2: docs/architecture.md, Manifests)."""
        manifest, status = found
        kinds = _accepted_types(accept)
        refusal = None
        if manifest.media_type in (OCI_MANIFEST, OCI_INDEX) and manifest.media_type not in kinds:
            kind = "OCI index" if manifest.media_type == OCI_INDEX else "OCI manifest"
            refusal = f"{kind} found, but accept header does not support it"
        elif (
            not is_digest(reference)
            and manifest.media_type == DOCKER_LIST
            and DOCKER_LIST not in kinds
        ):
            platform = _default_platform(manifest)
            if platform is not None:
                return (await self.get(upstream, target, platform))[0]
            refusal = "the manifest list has no linux/amd64 manifest"
        if refusal is not None:
            raise RegistryError("MANIFEST_UNKNOWN", refusal, headers={"Cache-Status": status})
        return manifest

    async def _get_tag(
        self, upstream: UpstreamClient, target: Target, tag: str
    ) -> tuple[Manifest, str]:
        known = self._storage.read_tag(target.local_name, tag)
        cached = self._cached(target, known[0]) if known else None
        fresh = known is not None and time.time() - known[1] < target.upstream.tag_ttl
        if cached is not None and fresh:
            return cached, HIT
        try:
            digest = await self._revalidations.run(
                (upstream.name, target.remote_name, tag),
                lambda: _tag_digest(upstream, target, tag),
            )
            # The tag's digest may be cached already (the same tag before, another tag).
            manifest = self._cached(target, digest) if digest else None
            status = REVALIDATED
            if manifest is None:
                manifest, status = await self._fetch(upstream, target, digest or tag), MISS
        except RegistryError as exc:
            # Whatever the upstream said, down or not (registry:2 falls back to its copy on
            # any error too): a tag deleted or refused upstream still pulls from the cache.
            if cached is not None:
                log.warning("serving %s:%s stale: %s", target.local_name, tag, exc.message)
                return cached, STALE
            raise
        # The tag names only a stored manifest: one the cache lacks would lose the cached one
        # it could have served stale.
        if self._stored(target, manifest):
            self._keep(
                f"tag {tag}", self._storage.write_tag, target.local_name, tag, manifest.digest
            )
        return manifest, status

    def _keep(self, what: str, write: Callable[[str, str, Any], None], *args: Any) -> None:
        """Cache a manifest or a tag if the disk lets us (it may be full); serve it either way."""
        try:
            write(*args)
        except OSError as exc:
            log.warning("not cached: %s: %s", what, exc)
            if self._evictor is not None:  # a full disk need not wait for the next pass
                self._evictor.write_failed(exc)

    def _stored(self, target: Target, manifest: Manifest) -> bool:
        """Whether `manifest` is on disk, stored again if not: one from memory may have been
        evicted since, or refused by a full disk. Asked before a tag is written, not on every
        hit by digest, which a look at the disk would slow by a sixth."""
        name, digest = target.local_name, manifest.digest
        if self._storage.manifest_last_pull(name, digest) is not None:
            return True
        self._keep(digest, self._storage.write_manifest, name, digest, manifest.data)
        return self._storage.manifest_last_pull(name, digest) is not None

    async def _fetch(self, upstream: UpstreamClient, target: Target, reference: str) -> Manifest:
        """The running fetch of a digest, or a new one; a tag is fetched on its own."""
        if not is_digest(reference):
            return await self._fetch_once(upstream, target, reference)
        return await self._fetches.run(
            (target.local_name, reference),
            lambda: self._fetch_once(upstream, target, reference),
        )

    async def _fetch_once(
        self, upstream: UpstreamClient, target: Target, reference: str
    ) -> Manifest:
        """GET from the upstream, verify the bytes against the digest, store."""
        response = _ok(upstream, await _ask(upstream, "GET", target, reference))
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
        self._keep(digest, self._storage.write_manifest, target.local_name, digest, response.body)
        metrics.pulled("manifest", len(response.body))
        manifest = Manifest(response.body, digest, media_type)
        self._remember((target.local_name, digest), manifest)
        return manifest


def _accepted_types(accept: str | None) -> set[str]:
    """The media types an Accept names, as registry:2 reads it: parameters (`q=0` too) are
    ignored, a wildcard names no type, and case counts."""
    return {kind.split(";")[0].strip() for kind in (accept or "").split(",")}


def _default_platform(manifest_list: Manifest) -> str | None:
    """The digest of a Docker manifest list's linux/amd64 manifest (registry:2's default)."""
    children = json.loads(manifest_list.data).get("manifests")
    for child in children if isinstance(children, list) else []:
        platform = child.get("platform") if isinstance(child, dict) else None
        if isinstance(platform, dict) and (platform.get("os"), platform.get("architecture")) == (
            "linux",
            "amd64",
        ):
            return check_digest(str(child.get("digest")))
    return None


def _get_may_answer(status: int) -> bool:
    """Whether a manifest HEAD's failure may not be its GET's: a server that does not do HEAD
    (405, 501, a 400 from a proxy in front of it), a proxy repository that answers a HEAD 404
    for what its GET would fetch (Artifactory's, Nexus's), a refusal whose reason only a GET's
    body gives (Harbor's 412). registry:2 asks with a GET on any failed HEAD (distribution's
    `tags.Get`); a refused login, a rate limit or a failing server gain nothing from one."""
    return status == 501 or (is_refusal(status) and status not in (401, 403))


async def _tag_digest(upstream: UpstreamClient, target: Target, tag: str) -> str | None:
    """The digest the upstream's tag points to now (HEAD), if the upstream says; None when
    only a GET can tell (no digest, or a HEAD its GET may answer otherwise)."""
    head = await _ask(upstream, "HEAD", target, tag)
    if head.status != 200 and _get_may_answer(head.status):
        return None
    _ok(upstream, head)
    digest: str | None = head.headers.get("docker-content-digest")
    if digest is None:
        return None
    try:
        return check_digest(digest)  # the upstream's word becomes a path
    except RegistryError as exc:
        reason = f"sent {digest[:80]!r} as the digest of {tag}"
        raise UpstreamUnavailable(upstream.name, reason) from exc


async def _ask(
    upstream: UpstreamClient, method: str, target: Target, reference: str
) -> UpstreamResponse:
    """A manifest HEAD or GET upstream, for every type (so that it answers with what it
    stores, never a conversion); the answer, whatever its status."""
    return await upstream.request(
        method,
        f"/v2/{target.remote_name}/manifests/{reference}",
        target.remote_name,
        headers={"Accept": UPSTREAM_ACCEPT},
    )


def _ok(upstream: UpstreamClient, response: UpstreamResponse) -> UpstreamResponse:
    """The answer if a 200; anything else becomes the client's error."""
    if response.status != 200:
        retry_after = response.headers.get("retry-after")
        raise upstream.error(response.status, "MANIFEST_UNKNOWN", retry_after, response.body)
    return response

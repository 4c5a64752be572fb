"""`edgeproxy cache ls|du|prune|warm|verify`: the cache of `[mirror] root`, by hand.

Each works on the storage directly, safely beside a running edgeproxy: `prune` takes the
eviction lock, `warm` pulls through the mirror's own code (fills take their own locks), and
`verify --remove` removes only blobs no client can be served correctly (removing one twice is
harmless, and a new fill of it writes a new file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)

from edgeproxy.config import Config, UpstreamConfig
from edgeproxy.mirror.app import MirrorApp
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.eviction import Entry, Evictor, Inventory, Plan, references, scan
from edgeproxy.mirror.names import (
    Target,
    check_digest,
    check_name,
    check_reference,
    resolve_target,
)
from edgeproxy.mirror.storage import FilesystemStorage
from edgeproxy.mirror.verify import findings


@contextlib.contextmanager
def owned_as_the_cache(root: Path) -> Iterator[None]:
    """Files made by a command run as root (`sudo edgeproxy cache prune`: the eviction lock,
    blob folders; `ls` too: opening the storage makes edgeproxy/fills/ on a registry:2 root)
    are handed to the cache's owner afterwards, or the service (User=edgeproxy) could no
    longer evict or cache. Not setuid: the command's Python may be root's only."""
    try:
        yield
    finally:
        try:
            owner: os.stat_result | None = root.stat()
        except OSError:
            owner = None
        if owner is not None and owner.st_uid != 0 and os.geteuid() == 0:
            _hand_over(root, owner.st_uid, owner.st_gid)


def _hand_over(root: Path, uid: int, gid: int) -> None:
    """chown what root owns under `root` to uid:gid. By folder descriptor, never following a
    link: the owner may swap a folder for a link to /etc meanwhile, and must not be handed
    what is there."""
    for _, folders, files, folder_fd in os.fwalk(root, follow_symlinks=False):
        for name in (*folders, *files):
            with contextlib.suppress(OSError):  # removed meanwhile: nothing to hand
                if os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_uid == 0:
                    os.chown(name, uid, gid, dir_fd=folder_fd, follow_symlinks=False)


def _storage(config: Config) -> FilesystemStorage | None:
    root = config.mirror.root
    if not (root / "docker" / "registry" / "v2").is_dir():
        print(f"edgeproxy: no cache at {root}", file=sys.stderr)
        return None
    return FilesystemStorage(root)


def size_text(size: int) -> str:
    """1536 -> "1.5 KiB": binary units, as the config's sizes."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _time_text(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def _closure(root: Entry, by_key: dict[tuple[str, str], Entry]) -> tuple[set[str], float]:
    """The digests an entry uses (itself, child manifests, configs, layers), and the latest
    last pull among its manifests."""
    digests: set[str] = set()
    last_pull = root.manifest.last_pull
    todo = [root]
    while todo:
        entry = todo.pop()
        if entry.manifest.digest in digests:
            continue
        digests.add(entry.manifest.digest)
        last_pull = max(last_pull, entry.manifest.last_pull)
        for ref in entry.refs:
            child = by_key.get((entry.manifest.name, ref))
            if child is not None:
                todo.append(child)
            else:
                digests.add(ref)
    return digests, last_pull


def _roots(inventory: Inventory) -> list[Entry]:
    """The manifests no other manifest of their repository references (tags, pulls by digest)."""
    children = {(e.manifest.name, ref) for e in inventory.entries for ref in e.refs}
    return [e for e in inventory.entries if (e.manifest.name, e.manifest.digest) not in children]


def _images(inventory: Inventory) -> list[tuple[Entry, set[str], float]]:
    """Each root manifest with the digests it uses and its latest last pull."""
    by_key = {(e.manifest.name, e.manifest.digest): e for e in inventory.entries}
    return [(root, *_closure(root, by_key)) for root in _roots(inventory)]


def _sized(digests: Iterable[str], inventory: Inventory) -> int:
    return sum(inventory.blobs[d].size for d in digests if d in inventory.blobs)


def ls(config: Config) -> int:
    """Repositories, tags, sizes (stored bytes of each image), last pulls."""
    storage = _storage(config)
    if storage is None:
        return 1
    inventory = scan(storage)
    rows = []
    for root, digests, last_pull in _images(inventory):
        tags = ",".join(root.manifest.tags) or "-"
        size = size_text(_sized(digests, inventory))
        rows.append((root.manifest.name, tags, root.manifest.digest[:19], size, last_pull))
    print(f"{'REPOSITORY':<40} {'TAG':<20} {'DIGEST':<19} {'SIZE':>10}  LAST PULL")
    for name, tags, digest, size, last_pull in sorted(rows):
        print(f"{name:<40} {tags:<20} {digest:<19} {size:>10}  {_time_text(last_pull)}")
    return 0


def du(config: Config) -> int:
    """Bytes per repository (a layer shared by two counts in both) and in all (once)."""
    storage = _storage(config)
    if storage is None:
        return 1
    inventory = scan(storage)
    used: dict[str, set[str]] = {}
    for root, digests, _ in _images(inventory):
        used.setdefault(root.manifest.name, set()).update(digests)
    for name in sorted(used):
        print(f"{size_text(_sized(used[name], inventory)):>10}  {name}")
    referenced = set().union(*used.values()) if used else set()
    loose = [d for d in inventory.blobs if d not in referenced]
    limit = config.mirror.cache.max_size
    print(
        f"{size_text(inventory.size):>10}  total: {len(inventory.blobs)} blobs"
        f" ({len(loose)} used by no manifest, {size_text(_sized(loose, inventory))})"
        + (f"; max_size {size_text(limit)}" if limit is not None else "")
    )
    return 0


def prune(config: Config, dry_run: bool) -> int:
    """Apply `[mirror.cache]` once; print what goes."""
    storage = _storage(config)
    if storage is None:
        return 1
    limits = config.mirror.cache
    evictor = Evictor(limits, storage, config.mirror.root / "edgeproxy")
    if not limits.limited:
        if not dry_run:
            evictor.prune()  # the sweeps only: old uploads, killed processes' leftovers
        print("no limits set: add max_size, min_free or max_age to [mirror.cache]")
        return 0
    done = evictor.prune(dry_run=dry_run)
    assert done is not None  # waited for the lock
    _print_plan(done, dry_run)
    return 0


def _print_plan(done: Plan, dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for entry in done.manifests:
        tags = ",".join(entry.manifest.tags) or "-"
        print(f"{verb} manifest {entry.manifest.name}@{entry.manifest.digest} (tags: {tags})")
    for blob in done.blobs:
        print(f"{verb} blob {blob.digest} ({size_text(blob.size)})")
    print(
        f"{verb} {len(done.manifests)} manifests, {len(done.blobs)} blobs,"
        f" {size_text(done.size_before - done.size_after)};"
        f" the cache {'would hold' if dry_run else 'holds'} {size_text(done.size_after)}"
    )


def verify(config: Config, remove: bool) -> int:
    """Re-hash every blob and manifest; 1 when a corrupt or unreadable one is left. Only
    corrupt ones are removed: an unreadable one may be readable again (EMFILE, a permission)."""
    storage = _storage(config)
    if storage is None:
        return 1
    checked = sum(1 for _ in storage.blobs())
    found = list(findings(storage))
    for finding in found:
        kind = "corrupt" if finding.corrupt else "unreadable"
        blob = finding.blob
        print(f"{kind}: {blob.digest} ({size_text(blob.size)}) {finding.problem}")
    corrupt = [f.blob.digest for f in found if f.corrupt]
    unreadable = len(found) - len(corrupt)
    if remove:
        storage.remove_blobs(corrupt)
        for digest in corrupt:
            print(f"removed: {digest}")
    removed = ", removed" if remove and corrupt else ""
    print(f"checked {checked} blobs: {len(corrupt)} corrupt{removed}, {unreadable} unreadable")
    return 1 if unreadable or (corrupt and not remove) else 0


def warm(config: Config, images: list[str], platform: str | None) -> int:
    """Pull IMAGEs (every platform of an index, or one) into the cache, as a client would."""
    return asyncio.run(_warm(config, images, platform))


async def _warm(config: Config, images: list[str], platform: str | None) -> int:
    mirror = MirrorApp(config.mirror)
    failed = 0
    console = Console(stderr=True)

    def say(text: str) -> None:  # names and upstream errors as they are: no rich markup
        console.print(text, markup=False, emoji=False, highlight=False)

    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            console=console,
        ) as progress:
            for image in images:
                try:
                    count = await _warm_one(mirror, progress, image, platform)
                except RegistryError as exc:
                    failed += 1
                    say(f"edgeproxy: {image}: {exc.message}")
                else:
                    say(f"{image}: {count} blob{'' if count == 1 else 's'} cached")
    finally:
        await mirror.aclose()
    return 1 if failed else 0


def parse_image(image: str, upstreams: list[UpstreamConfig]) -> tuple[Target, str]:
    """`[upstream/]name[:tag|@digest]` → the target and the reference (default `latest`)."""
    name, at, digest = image.partition("@")
    reference = digest
    if not at:
        head, colon, tag = name.rpartition(":")
        name, reference = (head, tag) if colon and "/" not in tag else (name, "latest")
    first, _, rest = name.partition("/")
    if rest and first in {u.name for u in upstreams}:
        return resolve_target(check_name(rest), first, upstreams), check_reference(reference)
    return resolve_target(check_name(name), None, upstreams), check_reference(reference)


def _platform_of(descriptor: dict[str, object]) -> str:
    platform = descriptor.get("platform")
    if not isinstance(platform, dict):
        return ""
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    return "/".join(str(p) for p in parts if p)


async def _warm_one(mirror: MirrorApp, progress: Progress, image: str, platform: str | None) -> int:
    target, reference = parse_image(image, list(mirror.config.upstream))
    upstream = mirror.upstreams[target.upstream.name]
    top, _ = await mirror.manifests.get(upstream, target, reference)
    mirror.pulls.manifest(target.local_name, top.digest)
    images = [top]
    document = json.loads(top.data)
    if isinstance(document.get("manifests"), list):  # an index: its platforms' manifests
        images = []
        for child in document["manifests"]:
            if not isinstance(child, dict):
                raise RegistryError("MANIFEST_INVALID", "an index entry is not a descriptor")
            name = _platform_of(child)
            if platform is not None and name != platform and not name.startswith(platform + "/"):
                continue
            digest = check_digest(str(child.get("digest")))  # the upstream's word: a path here
            manifest, _ = await mirror.manifests.get(upstream, target, digest)
            mirror.pulls.manifest(target.local_name, manifest.digest)
            images.append(manifest)
        if not images:
            raise RegistryError("MANIFEST_UNKNOWN", f"no manifest for platform {platform}")
    digests = sorted({check_digest(d) for manifest in images for d in references(manifest.data)})
    for digest in digests:
        await _warm_blob(mirror, progress, target, digest)
    return len(digests)


async def _warm_blob(mirror: MirrorApp, progress: Progress, target: Target, digest: str) -> None:
    label = digest[7:19]
    upstream = mirror.upstreams[target.upstream.name]
    if mirror.blobs.needs_confirming(target.local_name, digest):  # cached for another image
        await mirror.blobs.confirm(upstream, target, digest)
    size = mirror.blobs.size(digest)
    if size is not None:
        mirror.pulls.blob(target.local_name, digest)
        progress.add_task(f"{label} cached", total=size, completed=size)
        return
    fill = await mirror.blobs.fill(upstream, target, digest)
    task = progress.add_task(label, total=fill.size)
    async for chunk in mirror.blobs.read_fill(fill, 0, fill.size):
        progress.advance(task, len(chunk))
    while not fill.done:  # the bytes are verified; wait for them to be committed
        await fill.changed()
    if fill.error is not None:
        raise fill.error

"""`[mirror.cache]`: the cache keeps itself within `max_size`, `min_free` and `max_age`.

The unit of eviction is a manifest of a repository (the tags pointing at it go with it); its
age is that of its last pull, or of its index's when an index references it. A blob is
removed only when no kept manifest references it (an index its child manifests, an image its
config and layers); a blob no manifest references goes by its own last pull. Past `max_age`
everything goes; past `max_size`, or with less than `min_free` free on the cache's file
system, the least recently pulled goes first until the cache fits and that much is free.
The limits apply to whatever is stored, whenever it came. Whatever is pulled while a pass
runs (after its scan began) is kept, with what it references.

One process at a time applies them (a `flock`), in a thread, every `interval`, and early
when a worker's fills may have crossed `max_size` or `min_free` since the last pass, or a
write found the disk full. Removing a blob never cuts a transfer short: readers hold it open
(Linux keeps an unlinked file's data until the last fd closes), and fills in progress are
outside the blob store until committed. Once an hour (with limits or without) a pass also
sweeps what killed processes left.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import heapq
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgeproxy import metrics
from edgeproxy.config import CacheConfig
from edgeproxy.mirror.storage import Storage, StoredBlob, StoredManifest

log = logging.getLogger("edgeproxy.eviction")

UPLOADS_AGE = 7 * 86400.0  # registry:2's uploadpurging age: its leftovers older than this go
# What a killed process left (a write's temporary, an empty blob folder, a health probe's file)
# goes at this age, and is looked for this often: their writers finish within a second (a
# write of at most 4 MiB; a mkdir and a rename; a probe within its timeout), and an hour also
# covers a clock off by minutes.
LEFTOVERS_AGE = 3600.0
# An early pass waits this long after the last pass ended, or ten times what that pass took
# (a walk of the whole cache): passes take a tenth of a CPU at most, and one that freed
# nothing is not run again at once.
EARLY_GAP = 1.0
EARLY_GAP_FACTOR = 10.0
# A manifest's lists of descriptors, and the field holding each one's digest.
_DESCRIPTOR_LISTS = {
    "manifests": "digest",
    "layers": "digest",
    "blobs": "digest",
    "fsLayers": "blobSum",
}


def references(data: bytes) -> frozenset[str]:
    """The digests a manifest points at: an index's manifests, an image's config and layers
    (schema 1: its fsLayers). Unparsable bytes, and fields of another type than these have,
    reference nothing: any JSON object from an upstream is served and cached."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return frozenset()
    if not isinstance(document, dict):
        return frozenset()
    found: list[tuple[object, str]] = [(document.get("config"), "digest")]
    for key, field in _DESCRIPTOR_LISTS.items():
        items = document.get(key)
        if isinstance(items, list):
            found.extend((item, field) for item in items)
    digests = (item.get(field) for item, field in found if isinstance(item, dict))
    return frozenset(digest for digest in digests if isinstance(digest, str))


@dataclass(frozen=True)
class Entry:
    """A stored manifest and the digests it references."""

    manifest: StoredManifest
    refs: frozenset[str]


@dataclass(frozen=True)
class Inventory:
    """What the cache held when it was looked at (`taken`, before any listing began), and
    the bytes then free on its file system."""

    entries: list[Entry]
    blobs: dict[str, StoredBlob]
    taken: float
    free: int

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs.values())


@dataclass(frozen=True)
class Plan:
    """Manifests and blobs to remove, and the cache's size before and after."""

    manifests: list[Entry]
    blobs: list[StoredBlob]
    size_before: int
    size_after: int


def scan(storage: Storage, known: dict[str, frozenset[str]] | None = None) -> Inventory:
    """List the cache. `known` remembers manifests' references between scans (immutable)."""
    known = {} if known is None else known
    taken = time.time()
    free = storage.free_space()
    blobs = {blob.digest: blob for blob in storage.blobs()}
    entries = []
    for manifest in storage.manifests():
        refs = known.get(manifest.digest)
        if refs is None:
            data = storage.read_manifest(manifest.name, manifest.digest)
            refs = frozenset() if data is None else references(data)
            if data is not None:
                known[manifest.digest] = refs
        entries.append(Entry(manifest, refs))
    for gone in set(known) - {e.manifest.digest for e in entries}:
        del known[gone]
    return Inventory(entries, blobs, taken, free)


def plan(inventory: Inventory, limits: CacheConfig, now: float) -> Plan:
    """What the limits remove from `inventory`, least recently pulled first."""
    blobs = inventory.blobs
    keyed = {(e.manifest.name, e.manifest.digest): e for e in inventory.entries}
    # A child manifest counts as pulled whenever its index was, and goes after it.
    pulled = {key: e.manifest.last_pull for key, e in keyed.items()}
    depth = dict.fromkeys(keyed, 0)
    for _ in range(len(keyed)):  # bounded: a cycle of manifests cannot loop forever
        changed = False
        for key, entry in keyed.items():
            for child in ((key[0], ref) for ref in entry.refs):
                if child in keyed and child != key and depth[child] <= depth[key]:
                    depth[child] = depth[key] + 1
                    changed = True
                if child in keyed and pulled[child] < pulled[key]:
                    pulled[child] = pulled[key]
                    changed = True
        if not changed:
            break
    users: Counter[str] = Counter()
    for key, entry in keyed.items():
        users.update(d for d in entry.refs | {key[1]} if d in blobs)
    # (last pull, depth, sequence, manifest key or blob digest): the oldest first.
    heap: list[tuple[float, int, int, tuple[str, str] | str]] = []
    for key in keyed:
        heap.append((pulled[key], depth[key], len(heap), key))
    for digest, blob in blobs.items():
        if users[digest] == 0:
            heap.append((blob.last_pull, 0, len(heap), digest))
    heapq.heapify(heap)
    size = inventory.size
    cutoff = None if limits.max_age is None else now - limits.max_age
    # What must go for min_free: a removed blob's bytes are free again (once no reader holds
    # it open); the cache may hold less than that, when other files fill the disk.
    short = 0 if limits.min_free is None else max(0, limits.min_free - inventory.free)
    removed_manifests: list[Entry] = []
    removed_blobs: list[StoredBlob] = []
    while heap:
        last_pull, _, _, item = heap[0]
        too_old = cutoff is not None and last_pull < cutoff
        too_big = limits.max_size is not None and size > limits.max_size
        too_full = inventory.size - size < short
        if not (too_old or too_big or too_full):
            break
        heapq.heappop(heap)
        if isinstance(item, str):
            removed_blobs.append(blobs[item])
            size -= blobs[item].size
            continue
        entry = keyed[item]
        removed_manifests.append(entry)
        for digest in sorted(entry.refs | {item[1]}):
            if digest in blobs:
                users[digest] -= 1
                if users[digest] == 0:  # nothing kept references it: it goes too
                    removed_blobs.append(blobs[digest])
                    size -= blobs[digest].size
    return Plan(removed_manifests, removed_blobs, inventory.size, size)


@dataclass(frozen=True)
class LastPass:
    """What the last pass wrote in the lock file: when it ended, when its scan began, how
    long it took, and the cache's size it left (None: it did not scan)."""

    ended: float = 0.0
    taken: float = 0.0
    took: float = 0.0
    size: int | None = None

    @property
    def gap(self) -> float:
        """How long an early pass waits after this one."""
        return max(EARLY_GAP, EARLY_GAP_FACTOR * self.took)

    @classmethod
    def parse(cls, text: str) -> LastPass:
        try:
            fields = json.loads(text)
            size = fields["size"]
            return cls(
                float(fields["ended"]),
                float(fields["taken"]),
                float(fields["took"]),
                None if size is None else int(size),
            )
        except (ValueError, KeyError, TypeError):  # none yet, or being written
            return cls()


def execute(storage: Storage, planned: Plan, taken: float) -> Plan:
    """Remove what was planned, except what was pulled since the scan began and what such a
    manifest references (an index's children: the plan puts an index before them), or a
    manifest stored since (the plan never saw it); return what was removed."""
    if not planned.manifests and not planned.blobs:  # the usual pass: nothing to look at
        return planned
    kept = _stored_since(storage, taken)
    manifests = []
    for entry in planned.manifests:
        name, digest = entry.manifest.name, entry.manifest.digest
        last_pull = storage.manifest_last_pull(name, digest)
        if digest in kept or (last_pull is not None and last_pull > taken):
            kept |= entry.refs | {digest}
            continue
        storage.remove_manifest(name, digest)
        manifests.append(entry)
    kept |= _stored_since(storage, taken)  # again: stored while the manifests went
    blobs = []
    for blob in planned.blobs:
        last_pull = storage.blob_last_pull(blob.digest)
        if blob.digest not in kept and last_pull is not None and last_pull <= taken:
            blobs.append(blob)
    removed = {entry.manifest.digest for entry in manifests}
    saved = {b.digest: _bytes_of(storage, b.digest) for b in blobs if b.digest in removed}
    storage.remove_blobs([blob.digest for blob in blobs])
    # A worker that stored one of these manifests again since the look above found its bytes
    # in place and linked them: put them back (one that links later writes them itself).
    for stored in storage.manifests() if saved else []:
        data = saved.pop(stored.digest, None)
        if data is not None and storage.blob_size(stored.digest) is None:
            storage.write_manifest(stored.name, stored.digest, data)
            blobs = [blob for blob in blobs if blob.digest != stored.digest]
    freed = sum(blob.size for blob in blobs)
    return Plan(manifests, blobs, planned.size_before, planned.size_before - freed)


def _bytes_of(storage: Storage, digest: str) -> bytes | None:
    """A stored manifest's bytes (at most 4 MiB); None when they are gone."""
    try:
        reader = storage.open_blob(digest)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return reader.read(0, reader.size)
    finally:
        reader.close()


def _stored_since(storage: Storage, taken: float) -> set[str]:
    """The manifests stored or pulled since `taken` and what they reference: a pull racing
    the pass (a new image sharing an old one's layers) asks for those layers next."""
    found: set[str] = set()
    for manifest in storage.manifests():
        if manifest.last_pull > taken:
            data = storage.read_manifest(manifest.name, manifest.digest)
            found |= {manifest.digest} | (references(data) if data is not None else set())
    return found


class Evictor:
    """Applies the limits: once (`prune`), or every `interval` in the background, and early
    when this process's fills may have crossed a limit (`committed`, `write_failed`)."""

    def __init__(
        self, limits: CacheConfig, storage: Storage, state_dir: Path, workers: int = 1
    ) -> None:
        self.limits = limits
        self._workers = workers  # the processes filling the cache, each counting its own
        self._storage = storage
        self._lock_path = state_dir / "evict.lock"  # its content: the LastPass
        self._swept_path = state_dir / "swept"  # its mtime: when leftovers were last swept
        self._known: dict[str, frozenset[str]] = {}
        self._task: asyncio.Task[None] | None = None
        # (when, bytes) of the blobs this process committed that no pass has seen yet.
        self._commits: list[tuple[float, int]] = []
        self._early = asyncio.Event()  # a pass is wanted before the interval is up
        self._asked = 0.0  # when it was first wanted

    def start(self) -> None:
        # Without limits too: killed workers leave leftovers in any cache.
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def committed(self, size: int) -> None:
        """This process committed a blob of `size` bytes: a pass starts early when the cache
        may have crossed `max_size` since the last pass (these commits past the room it
        left), or the file system holds less than `min_free`. Each process counts its own
        commits, and asks at its share of the room (room / workers): together the workers pass
        `max_size` by a blob each at most before one asks, however unevenly they fill it."""
        if self.limits.max_size is None and self.limits.min_free is None:
            return
        self._commits.append((time.time(), size))
        last = self._last_pass()
        self._commits = [commit for commit in self._commits if commit[0] >= last.taken]
        if self._crossed(last):
            self._ask()

    def write_failed(self, error: OSError) -> None:
        """A write to the cache failed: when the disk is full (ENOSPC, EDQUOT), a pass starts
        early, if any limit may free."""
        if error.errno in (errno.ENOSPC, errno.EDQUOT) and self.limits.limited:
            self._ask()

    def _crossed(self, last: LastPass) -> bool:
        min_free, max_size = self.limits.min_free, self.limits.max_size
        try:
            if min_free is not None and self._storage.free_space() < min_free:
                return True
        except OSError:  # the pass will say what is wrong; never the fill that committed
            return True
        if max_size is None:
            return False
        if last.size is None:  # no pass has measured the cache yet
            return True
        return self._workers * sum(size for _, size in self._commits) > max_size - last.size

    def _ask(self, at: float | None = None) -> None:
        """Want a pass early, for what happened at `at` (now): a pass whose scan began
        after that has seen it."""
        at = time.time() if at is None else at
        self._asked = min(self._asked, at) if self._early.is_set() else at
        self._early.set()

    def _last_pass(self) -> LastPass:
        try:
            return LastPass.parse(self._lock_path.read_text())
        except OSError:
            return LastPass()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._early.wait(), self.limits.interval)
            early = None
            if self._early.is_set():
                early = self._asked
                last = await asyncio.to_thread(self._last_pass)
                await asyncio.sleep(max(0.0, last.ended + last.gap - time.time()))
                self._early.clear()
            try:
                done = await asyncio.to_thread(self.prune, wait=False, early=early)
            except Exception:
                log.exception("eviction failed")
                continue
            if done is None and early is not None and self._last_pass().taken <= early:
                # Another process was at it (its scan began before this was asked), or the
                # gap was not over: once more in a moment.
                await asyncio.sleep(EARLY_GAP)
                self._ask(early)
                continue
            if done is not None and (done.manifests or done.blobs):
                metrics.evicted("manifest", len(done.manifests))
                metrics.evicted("blob", len(done.blobs), done.size_before - done.size_after)
                log.info(
                    "evicted %d manifests and %d blobs (%d bytes); the cache holds %d bytes",
                    len(done.manifests),
                    len(done.blobs),
                    done.size_before - done.size_after,
                    done.size_after,
                )

    def prune(
        self, *, dry_run: bool = False, wait: bool = True, early: float | None = None
    ) -> Plan | None:
        """Apply the limits once (if any), and sweep leftovers (without `wait`: if the last
        sweep is an hour old). Without `wait`: None when another process is at it or was less
        than half an interval ago (every worker runs the loop; one works); for a pass asked
        for early (at `early`), when a pass began since or ended less than its gap ago."""
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return None
            lock.seek(0)
            last, started = LastPass.parse(lock.read()), time.time()
            if early is not None:
                if last.taken > early or started - last.ended < last.gap:
                    return None
            elif not wait and started - last.ended < self.limits.interval / 2:
                return None
            done, taken, size = Plan([], [], 0, 0), started, None
            if self.limits.limited:
                inventory = scan(self._storage, self._known)
                done = plan(inventory, self.limits, inventory.taken)
                if not dry_run:
                    done = execute(self._storage, done, inventory.taken)
                taken, size = inventory.taken, done.size_after
            if dry_run:
                return done
            if wait or self._sweep_due():
                self._sweep()
            ended = time.time()
            record = {"ended": ended, "taken": taken, "took": ended - started, "size": size}
            lock.seek(0)
            lock.truncate()
            lock.write(json.dumps(record) + "\n")
            return done

    def _sweep_due(self) -> bool:
        try:
            return self._swept_path.stat().st_mtime < time.time() - LEFTOVERS_AGE
        except FileNotFoundError:
            return True

    def _sweep(self) -> None:
        """Remove what nobody else removes: registry:2's old uploads, killed processes'
        leftovers. A walk of the whole cache: hourly, not every pass."""
        if uploads := self._storage.remove_uploads(time.time() - UPLOADS_AGE):
            log.info("removed %d uploads registry:2 left over a week ago", uploads)
        if leftovers := self._storage.remove_leftovers(time.time() - LEFTOVERS_AGE):
            log.info("removed %d leftovers of killed processes", leftovers)
        self._swept_path.touch()

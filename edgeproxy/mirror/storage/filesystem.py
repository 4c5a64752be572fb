"""registry:2's on-disk layout, so a /var/lib/registry left by a registry:2 mirror is served
warm, and a cache written here is readable by registry:2.

    docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data
    docker/registry/v2/repositories/<name>/_layers/sha256/<hex>/link
    docker/registry/v2/repositories/<name>/_manifests/revisions/sha256/<hex>/link
    docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/current/link
    docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/index/sha256/<hex>/link

Fills in progress live beside it in edgeproxy/fills/, guarded by `flock` so that worker
processes sharing the root fetch each blob once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from edgeproxy.mirror.storage.base import (
    BlobReader,
    PartialBlob,
    Storage,
    StoredBlob,
    StoredManifest,
)

# `_write_atomic`'s temporaries: `.<name>.<12 hex>.tmp` beside the file they become.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")
_LINKED = re.compile(r"[a-z0-9]+:[a-f0-9]+")  # what a link holds: a digest


class FileReader(BlobReader):
    """An open file: on Linux it reads on after the file is renamed or unlinked. A FileIO,
    so that a reader dropped without `close` (a response never started) frees its fd."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._file.fileno(), length, offset)

    def read_cached(self, offset: int, length: int) -> memoryview | None:
        # RWF_NOWAIT: the page cache's bytes or EAGAIN, never a wait for the disk.
        buffer = bytearray(length)
        try:
            count = os.preadv(self._file.fileno(), [buffer], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:  # a file system without RWF_NOWAIT
            if exc.errno == errno.EOPNOTSUPP:
                return None
            raise
        return memoryview(buffer)[:count]

    @property
    def size(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        self._file.close()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a whole small file so that readers see the old content or the new, never a part.
    A write that fails (a full disk) leaves none of the folders it made: nothing would ever
    remove an empty blob folder."""
    for attempt in range(2):
        made: list[Path] = []
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            _make_folders(path.parent, made)
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        except FileNotFoundError:  # an eviction removed the folder meanwhile: once more
            tmp.unlink(missing_ok=True)
            if attempt:
                _remove_folders(made)
                raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            _remove_folders(made)
            raise


def _make_folders(folder: Path, made: list[Path]) -> None:
    """Create `folder` and its missing parents, adding to `made` each this call created."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer's, just made
            each.mkdir()
            made.append(each)


def _remove_folders(made: list[Path]) -> None:
    """Remove the folders `_make_folders` made, deepest first, unless another writer uses them."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone)
            return


def _touch(path: Path) -> None:
    """Set the mtime to now: the last-pull time. A read-only or vanished file is left be."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except (FileNotFoundError, NotADirectoryError):
        return None


def _older(path: Path, before: float) -> bool:
    mtime = _mtime(path)
    return mtime is not None and mtime < before


def _holds(path: Path, data: bytes) -> bool:
    """Whether the file at `path` holds `data`."""
    try:
        return path.read_bytes() == data
    except (FileNotFoundError, NotADirectoryError):
        return False


def _read_link(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


class FilePartialBlob(PartialBlob):
    def __init__(self, storage: FilesystemStorage, digest: str, lock_fd: int) -> None:
        self._storage = storage
        self._digest = digest
        self._lock_fd = lock_fd
        self._released = False
        self._failed = False
        self._written = 0
        self._guard = threading.Lock()  # a commit and an abort never run at once
        self.path = storage.fill_path(digest, "partial")
        # A fresh inode: readers of an abandoned fill keep the old one and never see ours.
        self.path.unlink(missing_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def announce(self, size: int | None) -> None:
        if size is not None:
            _write_atomic(self._storage.fill_path(self._digest, "size"), str(size).encode())

    def write(self, data: bytes | bytearray) -> None:
        if self._failed:  # nothing lands after a failed write: it would be misplaced
            raise OSError(errno.EIO, "an earlier write to the spool failed")
        view = memoryview(data)
        try:
            while view:
                count = os.write(self._fd, view)
                self._written += count
                view = view[count:]
        except BaseException:
            self._failed = True
            raise

    def commit(self, size: int) -> None:
        with self._guard:
            if self._released:  # aborted meanwhile (a cancelled fill): the path is not ours
                raise OSError(errno.ECANCELED, "the spool was aborted")
            if self._failed or self._written != size:
                self._abort()
                raise OSError(errno.EIO, f"the spool holds {self._written} of {size} bytes")
            self._commit()

    def _commit(self) -> None:
        try:
            os.fsync(self._fd)
            target = self._storage.blob_path(self._digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, target)
        except BaseException:
            self.path.unlink(missing_ok=True)  # while locked: after, the path is the next fill's
            raise
        finally:
            self._release()

    def abort(self) -> None:
        with self._guard:  # waits for a commit running in another thread
            self._abort()

    def _abort(self) -> None:
        if not self._released:  # else a failed commit removed the spool already
            self.path.unlink(missing_ok=True)
            self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        os.close(self._fd)
        self._storage.fill_path(self._digest, "size").unlink(missing_ok=True)
        self._storage.unlock(self._digest, self._lock_fd)


class FilesystemStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = root
        self._v2 = root / "docker" / "registry" / "v2"
        self._fills = root / "edgeproxy" / "fills"
        self._fills.mkdir(parents=True, exist_ok=True)
        (self._v2 / "blobs").mkdir(parents=True, exist_ok=True)
        (self._v2 / "repositories").mkdir(parents=True, exist_ok=True)
        self.sweep_fills()

    def sweep_fills(self) -> None:
        """Remove what a fill killed mid-way (SIGKILL, a crash) left in edgeproxy/fills/: its
        lock is free once its process is gone, so a spool nobody holds belongs to no fill."""
        for stem in {path.name.rpartition(".")[0] for path in self._fills.iterdir()}:
            digest = stem.replace("-", ":", 1)
            try:
                lock_fd = self._lock(digest)
            except PermissionError:  # a reader of the cache (`cache ls` as another user)
                return
            if lock_fd is None:
                continue  # a running fill, in another worker
            for suffix in ("partial", "size"):
                self.fill_path(digest, suffix).unlink(missing_ok=True)
            self.unlock(digest, lock_fd)

    # Paths
    def blob_path(self, digest: str) -> Path:
        algorithm, hex_ = digest.split(":", 1)
        return self._v2 / "blobs" / algorithm / hex_[:2] / hex_ / "data"

    def fill_path(self, digest: str, suffix: str) -> Path:
        return self._fills / f"{digest.replace(':', '-')}.{suffix}"

    def _repo(self, name: str) -> Path:
        return self._v2 / "repositories" / name

    @staticmethod
    def _digest_link(folder: Path, digest: str) -> Path:
        algorithm, hex_ = digest.split(":", 1)
        return folder / algorithm / hex_ / "link"

    # Blobs
    def blob_size(self, digest: str) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def open_blob(self, digest: str) -> BlobReader:
        return FileReader(self.blob_path(digest))

    def _lock(self, digest: str) -> int | None:
        """An fd holding the fill lock for `digest`, or None when another holder has it."""
        path = self.fill_path(digest, "lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder before us unlinked it: lock the new file instead

    def unlock(self, digest: str, lock_fd: int) -> None:
        """Let a fill lock go, unlinking its file while still holding it (`_lock` re-checks
        the inode it locked): no lock file outlives its holder."""
        self.fill_path(digest, "lock").unlink(missing_ok=True)
        os.close(lock_fd)

    def try_begin_blob(self, digest: str) -> PartialBlob | None:
        lock_fd = self._lock(digest)
        if lock_fd is None:
            return None
        if self.blob_size(digest) is not None:  # committed by the holder we just followed
            self.unlock(digest, lock_fd)
            return None
        try:
            return FilePartialBlob(self, digest, lock_fd)
        except BaseException:
            self.unlock(digest, lock_fd)
            raise

    def partial_progress(self, digest: str) -> tuple[int, int | None, int] | None:
        lock_fd = self._lock(digest)
        if lock_fd is not None:  # nobody holds it: no fill is running
            self.unlock(digest, lock_fd)
            return None
        try:
            spool = self.fill_path(digest, "partial").stat()
            written, identity = spool.st_size, spool.st_ino
        except FileNotFoundError:
            written, identity = 0, 0
        size = _read_link(self.fill_path(digest, "size"))
        return written, int(size) if size and size.isdigit() else None, identity

    def committed_from(self, digest: str, spool: int) -> bool:
        # A rename keeps the inode; a spool a reader holds open keeps its number from reuse.
        try:
            return self.blob_path(digest).stat().st_ino == spool
        except (FileNotFoundError, NotADirectoryError):
            return False

    def open_partial(self, digest: str) -> BlobReader | None:
        for path in (self.fill_path(digest, "partial"), self.blob_path(digest)):
            try:
                return FileReader(path)
            except FileNotFoundError:
                continue
        return None

    # Repositories
    def link_blob(self, name: str, digest: str) -> None:
        link = self._digest_link(self._repo(name) / "_layers", digest)
        if not link.exists():
            _write_atomic(link, digest.encode())

    def blob_linked(self, name: str, digest: str) -> bool:
        return self._digest_link(self._repo(name) / "_layers", digest).exists()

    def read_manifest(self, name: str, digest: str) -> bytes | None:
        revisions = self._repo(name) / "_manifests" / "revisions"
        if _read_link(self._digest_link(revisions, digest)) != digest:
            return None
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def write_manifest(self, name: str, digest: str, data: bytes) -> None:
        path = self.blob_path(digest)
        # None yet, or one a power cut tore (renamed into place without an fsync).
        if self.blob_size(digest) != len(data) or not _holds(path, data):
            _write_atomic(path, data)
        # registry:2 finds repositories by their _layers folder (its catalog, and the ones
        # its garbage-collect keeps the manifests of): a manifest read alone needs one too.
        (self._repo(name) / "_layers").mkdir(parents=True, exist_ok=True)
        revisions = self._repo(name) / "_manifests" / "revisions"
        _write_atomic(self._digest_link(revisions, digest), digest.encode())
        # An eviction may have removed the bytes between the look above and the link (it puts
        # back those it finds linked once they are gone; a link made after that look, here).
        if self.blob_size(digest) is None:
            _write_atomic(self.blob_path(digest), data)
        # The sweep may have removed an old empty `_layers` before the link (it makes it
        # again when it finds the link; made after that look, here).
        (self._repo(name) / "_layers").mkdir(exist_ok=True)

    def read_tag(self, name: str, tag: str) -> tuple[str, float] | None:
        link = self._repo(name) / "_manifests" / "tags" / tag / "current" / "link"
        try:
            digest = link.read_text().strip()
            mtime = link.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None
        # A link a power cut tore (renamed into place without an fsync) names no manifest.
        return (digest, mtime) if _LINKED.fullmatch(digest) else None

    def write_tag(self, name: str, tag: str, digest: str) -> None:
        folder = self._repo(name) / "_manifests" / "tags" / tag
        current = folder / "current" / "link"
        if _read_link(current) == digest:
            os.utime(current)  # the mtime says when the upstream last confirmed the tag
            return
        _write_atomic(self._digest_link(folder / "index", digest), digest.encode())
        _write_atomic(current, digest.encode())

    def list_tags(self, name: str) -> list[str]:
        tags = self._repo(name) / "_manifests" / "tags"
        try:
            return sorted(t.name for t in tags.iterdir() if (t / "current" / "link").exists())
        except FileNotFoundError:
            return []

    def repositories(self) -> list[str]:
        return sorted(name for name, dirs in self._repository_dirs() if "_manifests" in dirs)

    def _repository_dirs(self) -> Iterator[tuple[str, list[str]]]:
        """(name, its _ folders) of every repository, with manifests or only layer links."""
        base = self._v2 / "repositories"
        for folder, dirs, _ in os.walk(base):
            own = [d for d in dirs if d.startswith("_")]
            if own:
                yield os.path.relpath(folder, base), own
            dirs[:] = [d for d in dirs if not d.startswith("_")]

    # Last pulls: the mtimes of registry:2's own files (the revision link of a manifest, the
    # data of a blob), which registry:2 ignores. Written at most once a minute per item by
    # the caller; a registry:2 cache brings its write times as the last pulls.
    def _revision(self, name: str, digest: str) -> Path:
        return self._digest_link(self._repo(name) / "_manifests" / "revisions", digest)

    def record_manifest_pull(self, name: str, digest: str) -> None:
        _touch(self._revision(name, digest))

    def record_blob_pull(self, name: str, digest: str) -> None:
        _touch(self.blob_path(digest))

    def manifest_last_pull(self, name: str, digest: str) -> float | None:
        return _mtime(self._revision(name, digest))

    def blob_last_pull(self, digest: str) -> float | None:
        return _mtime(self.blob_path(digest))

    def free_space(self) -> int:
        # f_bavail: what an unprivileged writer may use (the service's user), as nginx's
        # min_free counts it.
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def blobs(self) -> Iterator[StoredBlob]:
        for algorithm in _subdirs(self._v2 / "blobs"):
            for prefix in _subdirs(algorithm):
                for folder in _subdirs(prefix):
                    try:
                        stat = (folder / "data").stat()
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    digest = f"{algorithm.name}:{folder.name}"
                    yield StoredBlob(digest, stat.st_size, stat.st_mtime)

    def manifests(self) -> Iterator[StoredManifest]:
        for name in self.repositories():
            folder = self._repo(name) / "_manifests"
            tags: dict[str, list[str]] = {}
            for tag in _subdirs(folder / "tags"):
                digest = _read_link(tag / "current" / "link")
                if digest:
                    tags.setdefault(digest, []).append(tag.name)
            for algorithm in _subdirs(folder / "revisions"):
                for revision in _subdirs(algorithm):
                    digest = f"{algorithm.name}:{revision.name}"
                    last_pull = _mtime(revision / "link")
                    if last_pull is not None:
                        yield StoredManifest(
                            name, digest, last_pull, tuple(sorted(tags.get(digest, [])))
                        )

    def remove_manifest(self, name: str, digest: str) -> None:
        repo = self._repo(name)
        manifests = repo / "_manifests"
        for tag in _subdirs(manifests / "tags"):
            if _read_link(tag / "current" / "link") == digest:
                shutil.rmtree(tag, ignore_errors=True)
            else:  # the tag moved on: forget that it once pointed here
                shutil.rmtree(self._digest_link(tag / "index", digest).parent, ignore_errors=True)
        shutil.rmtree(self._revision(name, digest).parent, ignore_errors=True)
        self._remove_if_empty(name)

    def _remove_if_empty(self, name: str) -> None:
        """Remove a repository left without manifests."""
        repo = self._repo(name)
        if not any(True for a in _subdirs(repo / "_manifests" / "revisions") for _ in _subdirs(a)):
            # Its own folders only: `team/app/sidecar` lives inside `team/app`.
            for own in ("_manifests", "_layers", "_uploads"):
                shutil.rmtree(repo / own, ignore_errors=True)
            _remove_empty_parents(repo, self._v2 / "repositories")

    def remove_uploads(self, before: float) -> int:
        # registry:2 leaves `_uploads/<id>` when a download to its cache fails (it never
        # cancels them) and purges them after a week; a cache taken over must too.
        count = 0
        for name, dirs in list(self._repository_dirs()):
            if "_uploads" not in dirs:
                continue
            uploads = self._repo(name) / "_uploads"
            for upload in _subdirs(uploads):
                started = _mtime(upload / "startedat") or _mtime(upload)
                if started is not None and started < before:
                    shutil.rmtree(upload, ignore_errors=True)
                    count += 1
            with contextlib.suppress(OSError):  # not empty: an upload goes on
                uploads.rmdir()
            _remove_empty_parents(self._repo(name), self._v2 / "repositories")
        return count

    def remove_leftovers(self, before: float) -> int:
        # What a SIGKILL leaves and nothing else removes: an atomic write's temporary, a blob
        # folder made for a commit or a write that never came (or half an eviction's rmtree),
        # a tag written just after an eviction removed its manifest (pulls by it would fail
        # rather than ask the upstream). `before` is long past any writer still at work; one
        # whose temporary goes anyway writes again (`_write_atomic`).
        count = 0
        blobs = self._v2 / "blobs"
        for top in (self._v2, self._fills):
            for folder, dirs, files in os.walk(top, topdown=False):
                left = []
                for name in files:
                    path = Path(folder, name)
                    try:
                        if _TEMPORARY.fullmatch(name) and _older(path, before):
                            path.unlink()
                            count += 1
                            continue
                    except OSError:  # gone meanwhile, or another user's
                        pass
                    left.append(name)
                # <alg>/<xx>/<hex> or <alg>/<xx>, empty (bottom-up: a child just removed is
                # still listed, and made its parent new) and old: no commit is about to fill it.
                here = Path(folder)
                depth = len(here.relative_to(blobs).parts) if here.is_relative_to(blobs) else 0
                if depth >= 2 and not dirs and not left and _older(here, before):
                    with contextlib.suppress(OSError):  # filled meanwhile after all
                        os.rmdir(here)
                        count += 1
        for name, dirs in list(self._repository_dirs()):  # one walk of the repositories
            if "_manifests" in dirs:
                for tag in _subdirs(self._repo(name) / "_manifests" / "tags"):
                    digest = _read_link(tag / "current" / "link")  # read now, right before
                    if digest and ":" in digest and not self._revision(name, digest).exists():
                        shutil.rmtree(tag, ignore_errors=True)
                        self._remove_if_empty(name)  # as the eviction that removed the manifest
                        count += 1
            count += self._remove_unreadable(name, before)
        return count

    def _remove_unreadable(self, name: str, before: float) -> int:
        """Remove what of a repository no reader can use, last changed before `before` (a
        kill's, a full disk's, an eviction's): a tag folder without its current link
        (registry:2 listed the tag, then answered 404 for it), and the repository when its
        folders hold no file at all (an empty `_manifests` was in our catalog, an empty
        `_layers` in registry:2's). A repository with a file keeps its other folders, empty
        or not: registry:2 finds repositories by `_layers`, and answers an empty `tags`
        folder's list, not a 404."""
        repo = self._repo(name)
        # As they were before anything here changed them: a folder emptied now was old too.
        old, holding = set(), set()  # folders last changed before `before`, holding a file
        for top in (repo / "_manifests", repo / "_layers"):
            for folder, _, names in os.walk(top):
                if names:
                    holding.add(folder)
                if _older(Path(folder), before):
                    old.add(folder)
        count = 0
        for tag in _subdirs(repo / "_manifests" / "tags"):
            if str(tag) in old and not (tag / "current" / "link").exists():
                shutil.rmtree(tag, ignore_errors=True)
                holding = {f for f in holding if not Path(f).is_relative_to(tag)}
                count += 1
        if holding:
            return count
        for folder in sorted(old, key=len, reverse=True):  # the deepest first
            with contextlib.suppress(OSError):  # not empty (written meanwhile, young), or gone
                os.rmdir(folder)
                count += 1
        # A manifest written meanwhile makes its `_layers` after its revision link too.
        if (repo / "_manifests").exists():
            (repo / "_layers").mkdir(exist_ok=True)
        _remove_empty_parents(repo, self._v2 / "repositories")
        return count

    def remove_blobs(self, digests: list[str]) -> None:
        # The links first: a repository never names a blob that is gone. Each repository's
        # links are listed once (far fewer look-ups than repositories x digests).
        doomed = set(digests)
        for name, dirs in list(self._repository_dirs()):
            if "_layers" in dirs:
                for algorithm in _subdirs(self._repo(name) / "_layers"):
                    for link in _subdirs(algorithm):
                        if f"{algorithm.name}:{link.name}" in doomed:
                            shutil.rmtree(link, ignore_errors=True)
        for digest in digests:
            folder = self.blob_path(digest).parent
            shutil.rmtree(folder, ignore_errors=True)
            _remove_empty_parents(folder.parent, self._v2 / "blobs")


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [entry for entry in folder.iterdir() if entry.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone)
            return
        folder = folder.parent

"""Many different cold blobs at once through one edgeproxy worker (or registry:2 in proxy mode).

`.venv/bin/python -m bench.many_cold --counts 50,200,500 --mib 16`: N clients each GET a blob
of their own, all cold, from a real registry:2 upstream on loopback (`--rate 1gbit`: behind a
tbf-limited link in a network namespace, root only). Prints, per N: wall time, MB/s, the
mirror's CPU time, its peak RSS, threads and open fds (master and worker together), the
clients' wait for the response head, and what they got. `--nofile 256` starts the mirror with
that soft limit on open files. Not run by the tests; bench/README.md has its figures.
The upstream's blobs are written straight into its storage (no push), kept in --workdir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    NamespacedUpstream,
    blob_data_path,
    create_shaped_link,
    pid_with_args,
    process_tree,
    remove_shaped_link,
    stop_group,
    tree_cpu_seconds,
    wait_ready,
)
from tests.support.ports import free_port
from tests.support.registry import Registry, start_registry
from tests.support.servers import write_toml

MiB = 1 << 20
REPO = "bench/many"


def make_blobs(root: Path, count: int, size: int) -> list[str]:
    """`count` distinct blobs of `size` bytes linked in REPO of the registry storage at
    `root`; kept (and reused by runs of that size) across runs."""
    listing = root / "many-digests.txt"
    digests = listing.read_text().split() if listing.exists() else []
    paths = [blob_data_path(root, d) for d in digests[:count]]
    if len(paths) == count and all(p.exists() and p.stat().st_size == size for p in paths):
        return digests[:count]
    base = bytearray(os.urandom(size))
    digests = []
    layers = root / "docker/registry/v2/repositories" / REPO / "_layers/sha256"
    for index in range(count):
        base[:8] = index.to_bytes(8, "big")  # distinct bytes, the rest shared
        digest = "sha256:" + hashlib.sha256(base).hexdigest()
        data = blob_data_path(root, digest)
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_bytes(base)
        link = layers / digest.removeprefix("sha256:") / "link"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_text(digest)
        digests.append(digest)
    listing.write_text("\n".join(digests) + "\n")
    return digests


@dataclass
class Peaks:
    rss_kib: int = 0
    threads: int = 0
    fds: int = 0


class Sampler(threading.Thread):
    """Peak RSS (summed VmRSS), threads and fds of a process tree, every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peaks = Peaks()
        self.timeline: list[tuple[float, int, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            rss = threads = fds = 0
            for pid in process_tree(self.pid):
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    rss += int(re.search(r"^VmRSS:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
                    threads += int(re.search(r"^Threads:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
                    fds += len(os.listdir(f"/proc/{pid}/fd"))
            peaks = self.peaks
            peaks.rss_kib, peaks.threads = max(peaks.rss_kib, rss), max(peaks.threads, threads)
            peaks.fds = max(peaks.fds, fds)
            self.timeline.append((time.monotonic(), rss, threads, fds))


@dataclass
class Result:
    statuses: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    first_byte: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


async def get(host: str, port: int, path: str, size: int, result: Result, timeout: float) -> None:
    started = time.monotonic()
    outcome = "?"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=4 * MiB)
            try:
                request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
                writer.write(request.encode())
                head = await reader.readuntil(b"\r\n\r\n")
                result.first_byte.append(time.monotonic() - started)
                status = int(head.split(b" ", 2)[1])
                got = 0
                while chunk := await reader.read(MiB):
                    got += len(chunk)
                result.bytes += got
                outcome = str(status) if status != 200 or got == size else f"{status} short"
            finally:
                writer.close()
    except TimeoutError:
        outcome = "timeout"
    except (OSError, asyncio.IncompleteReadError) as exc:
        outcome = type(exc).__name__
    result.statuses[outcome] = result.statuses.get(outcome, 0) + 1
    result.seconds.append(time.monotonic() - started)


def start_edgeproxy(
    work: Path, upstream: str, nofile: int | None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = {
        "mirror": {
            "root": str(work / "cache"),
            "upstream": [{"name": "docker.io", "url": upstream}],
        },
        "edge": {"http": f"127.0.0.1:{port}", "workers": 1, "access_log": "off"},
    }
    path = write_toml(work / "proxy.toml", config)

    def limit() -> None:
        if nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    with (work / "edgeproxy.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeproxy.cli", "run", "--config", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=limit,
        )
    wait_ready(f"http://127.0.0.1:{port}/v2/", process, work / "edgeproxy.log")
    return process, port


def run_one(args: argparse.Namespace, upstream: str, digests: list[str], count: int) -> str:
    work = Path(tempfile.mkdtemp(prefix=f"many-{count}-", dir=args.workdir))
    baseline: Registry | None = None
    process: subprocess.Popen[bytes] | None = None
    try:
        if args.baseline:
            own = resource.getrlimit(resource.RLIMIT_NOFILE)
            if args.nofile is not None:  # inherited by the registry's process
                resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, own[1]))
            try:
                baseline = start_registry(work / "baseline", remote=upstream)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, own)
            port = baseline.port
            found = pid_with_args("serve", str(baseline.config_path))
            assert found is not None, "registry:2 is not running"
            pid = found
        else:
            process, port = start_edgeproxy(work, upstream, args.nofile)
            pid = process.pid
        size = args.mib * MiB
        result = Result()
        sampler = Sampler(pid)
        sampler.start()
        cpu = tree_cpu_seconds(pid)
        started = time.monotonic()

        async def all_of_them() -> None:
            await asyncio.gather(
                *(
                    get("127.0.0.1", port, f"/v2/{REPO}/blobs/{d}", size, result, args.timeout)
                    for d in digests[:count]
                )
            )

        asyncio.run(all_of_them())
        wall = time.monotonic() - started
        cpu = tree_cpu_seconds(pid) - cpu
        sampler.done.set()
        sampler.join()
        peaks = sampler.peaks
        first = sorted(result.first_byte)
        heads = f"{first[len(first) // 2]:.1f}/{first[-1]:.1f}" if first else "-"
        kind = "registry:2" if args.baseline else "edgeproxy"
        rate = result.bytes / wall / 1e6
        line = (
            f"| {kind} | {count} x {args.mib} MiB | {wall:.1f} s | {rate:.0f} MB/s"
            f" | {cpu:.1f} CPU-s | {peaks.rss_kib / 1024:.0f} MiB | {peaks.threads} | {peaks.fds}"
            f" | {heads} s | {dict(sorted(result.statuses.items()))} |"
        )
        print(line, flush=True)
        if args.timeline:
            step = max(1, len(sampler.timeline) // 20)
            for at, rss, threads, fds in sampler.timeline[::step]:
                print(f"  {at - started:6.1f} s: {rss // 1024} MiB, {threads} threads, {fds} fds")
        return line
    finally:
        if process is not None:
            stop_group(process)
        if baseline is not None:
            baseline.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="50,200,500")
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "many_cold")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--nofile", type=int, help="the mirror's soft RLIMIT_NOFILE (ulimit -Sn)")
    parser.add_argument("--keep", action="store_true", help="keep the mirror's folder (log)")
    parser.add_argument("--timeline", action="store_true", help="print samples over time")
    parser.add_argument("--rate", help="the upstream's link rate, e.g. 400mbit (tbf)")
    parser.add_argument("--baseline", action="store_true", help="registry:2 in proxy mode instead")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    upstream = start_registry(args.workdir / "upstream")
    try:
        digests = make_blobs(upstream.root, max(counts), args.mib * MiB)
        print(
            "| mirror | blobs | wall | MB/s | mirror CPU | peak RSS | peak threads | peak fds"
            " | head median/max | outcomes |\n|---|---|---|---|---|---|---|---|---|---|",
            flush=True,
        )
        with contextlib.ExitStack() as stack:
            url = upstream.url
            if args.rate:  # the upstream behind a tbf-limited link (root: a network namespace)
                link = create_shaped_link(args.rate)
                stack.callback(remove_shaped_link, link)
                shaped = NamespacedUpstream(link, upstream.root, args.workdir / "shaped")
                stack.callback(shaped.stop)
                url = shaped.url
            for count in counts:
                os.sync()
                run_one(args, url, digests, count)
    finally:
        upstream.close()


if __name__ == "__main__":
    main()

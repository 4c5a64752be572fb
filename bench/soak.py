"""Load and soak: many clients pull a mix of cold and warm images through the TLS edge
(embedded mirror) from a real registry:2 upstream for a few minutes; in the second half,
1000 slowloris connections (half a request head each, a header line now and then) sit beside
them. Every body is digest-checked; the edgeproxy processes' open fds and RSS are sampled;
the upstream's access log says how often each blob was fetched. Writes bench/SOAK.md.

Run it as `bench/soak [options]` (`--help`); not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import os
import platform
import random
import re
import shlex
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.harness import process_tree
from edgeproxy.service.memory import QUIET_CHECK
from tests.support.edge import Edge, run_edge
from tests.support.images import Image, RandomLayer, build_image, push
from tests.support.registry import Registry, start_registry
from tests.support.verify import verify_cache

SOAK = Path(__file__).resolve().parent / "SOAK.md"
KiB, MiB = 1 << 10, 1 << 20
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class Pullable:
    """One image as the upstream has it: what a client asks for and what it must get."""

    repo: str
    tag: str
    manifest: str
    blobs: list[Blob]
    release: float  # seconds into the run when clients start asking for it (cold until then)


@dataclass
class Stats:
    """What the clients saw, per phase ("load", "slowloris")."""

    pulls: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)  # Cache-Status of blob responses
    failures: list[str] = field(default_factory=list)
    manifest_ms: dict[str, list[float]] = field(default_factory=dict)
    pull_s: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    t: float
    phase: str
    fds: int
    rss_mib: float
    processes: int
    slowloris_open: int


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.stats = Stats()
        self.samples: list[Sample] = []
        self.images: list[Pullable] = []
        self.started = 0.0
        self.started_wall = 0.0  # time.time() at the start, for the access log's timestamps
        self.slowloris_open = 0
        self.slowloris_closed_by_server = 0
        self.slowloris_opened = 0
        self.watchers: set[asyncio.Task[None]] = set()

    def log(self, message: str) -> None:
        print(f"[soak {time.monotonic() - self.started:7.1f}s] {message}", flush=True)

    def phase(self) -> str:
        half = self.args.duration / 2
        return "load" if time.monotonic() - self.started < half else "slowloris"

    # Setup
    def build_and_push(self, upstream: Registry) -> None:
        rng = random.Random(7)
        layout = self.work / "layout"
        release_window = self.args.duration * 0.6
        for index in range(self.args.images):
            sizes = [rng.randint(32 * KiB, self.args.max_layer_mib * MiB) for _ in range(5)]
            layers = [RandomLayer(size, seed=index * 100 + n) for n, size in enumerate(sizes)]
            image = build_image(layout, f"img{index}", layers)
            repo = f"soak/img{index}"
            push(image, upstream, repo, "v1")
            self.images.append(pullable(image, repo, release_window * index / self.args.images))
        total = sum(b.size for image in self.images for b in image.blobs)
        self.log(f"pushed {len(self.images)} images, {total / MiB:.0f} MiB of blobs")

    # Clients
    async def client(self, index: int, base: str, context: ssl.SSLContext) -> None:
        """One connection (keep-alive) pulling images until the end of the run."""
        rng = random.Random(index)
        connector = aiohttp.TCPConnector(ssl=context, limit=1)
        timeout = aiohttp.ClientTimeout(total=300, sock_read=120)
        async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
            while (now := time.monotonic() - self.started) < self.args.duration:
                released = [image for image in self.images if image.release <= now]
                await self.pull(session, rng.choice(released))

    async def pull(self, session: aiohttp.ClientSession, image: Pullable) -> None:
        phase, begun = self.phase(), time.monotonic()
        try:
            async with session.get(
                f"/v2/{image.repo}/manifests/{image.tag}", headers={"Accept": ACCEPT}
            ) as response:
                body = await response.read()
                self.stats.requests[phase] += 1
                if response.status != 200 or sha256(body) != image.manifest:
                    raise PullError(f"manifest {image.repo}: {response.status}, {sha256(body)}")
                if response.headers.get("Docker-Content-Digest") != image.manifest:
                    raise PullError(f"manifest {image.repo}: wrong Docker-Content-Digest")
            self.stats.manifest_ms.setdefault(phase, []).append(1000 * (time.monotonic() - begun))
            for blob in image.blobs:
                await self.fetch_blob(session, image.repo, blob, phase)
        except (PullError, aiohttp.ClientError, TimeoutError) as exc:
            self.stats.failures.append(f"{phase}: {type(exc).__name__}: {exc}")
            return
        self.stats.pulls[phase] += 1
        self.stats.pull_s.setdefault(phase, []).append(time.monotonic() - begun)

    async def fetch_blob(
        self, session: aiohttp.ClientSession, repo: str, blob: Blob, phase: str
    ) -> None:
        hasher = hashlib.sha256()
        size = 0
        async with session.get(f"/v2/{repo}/blobs/{blob.digest}") as response:
            if response.status != 200:
                raise PullError(f"blob {blob.digest}: status {response.status}")
            self.stats.cache[response.headers.get("Cache-Status", "none")] += 1
            async for chunk in response.content.iter_chunked(MiB):
                hasher.update(chunk)
                size += len(chunk)
        self.stats.requests[phase] += 1
        self.stats.bytes[phase] += size
        if size != blob.size or "sha256:" + hasher.hexdigest() != blob.digest:
            raise PullError(f"blob {blob.digest}: {size} bytes, sha256:{hasher.hexdigest()}")

    # Slowloris
    async def slowloris(self, port: int, context: ssl.SSLContext) -> None:
        """Open the connections at the half, each with half a request head; add a header line
        every 10 s; close them at the end."""
        await asyncio.sleep(self.args.duration / 2)
        self.log(f"opening {self.args.slowloris} slowloris connections")
        connections = await asyncio.gather(
            *(self.slow_connection(port, context, n) for n in range(self.args.slowloris)),
            return_exceptions=True,
        )
        held = [c for c in connections if isinstance(c, asyncio.StreamWriter)]
        self.slowloris_opened = len(held)
        failed = [c for c in connections if isinstance(c, BaseException)]
        self.log(f"{len(held)} slowloris connections open" + (f"; {failed[0]!r}" if failed else ""))
        line = 0
        while time.monotonic() - self.started < self.args.duration:
            await asyncio.sleep(10)
            line += 1
            for writer in held:
                if not writer.is_closing():
                    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                        writer.write(f"X-Slow-{line}: {'a' * 8}\r\n".encode())
        self.slowloris_closed_by_server = self.slowloris_opened - self.slowloris_open
        for writer in held:
            writer.close()

    async def slow_connection(
        self, port: int, context: ssl.SSLContext, index: int
    ) -> asyncio.StreamWriter:
        await asyncio.sleep(index * 0.002)  # a handshake every 2 ms, not 1000 at once
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n")
        await writer.drain()
        self.slowloris_open += 1
        self.watchers.add(asyncio.create_task(self.watch(reader)))
        return writer

    async def watch(self, reader: asyncio.StreamReader) -> None:
        """Count the connection as closed once the server ends it (whatever it sent first)."""
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while await reader.read(65536):
                pass
        if time.monotonic() - self.started < self.args.duration:
            self.slowloris_open -= 1

    # Sampling
    async def sample(self, pid: int) -> None:
        while time.monotonic() - self.started < self.args.duration + 1:
            self.samples.append(measure(pid, time.monotonic() - self.started, self.phase(),
                                        self.slowloris_open))  # fmt: skip
            await asyncio.sleep(self.args.sample_every)

    async def run(self, edge: Edge) -> None:
        assert edge.certificate is not None and edge.https_port is not None
        context = ssl.create_default_context(cafile=str(edge.certificate))
        self.started, self.started_wall = time.monotonic(), time.time()
        tasks = [
            asyncio.create_task(self.client(n, edge.https_url, context))
            for n in range(self.args.clients)
        ]
        tasks.append(asyncio.create_task(self.sample(edge.process.pid)))
        if self.args.slowloris:
            tasks.append(asyncio.create_task(self.slowloris(edge.https_port, context)))
        progress = asyncio.create_task(self.progress())
        await asyncio.gather(*tasks)
        progress.cancel()

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(30)
            last = self.samples[-1] if self.samples else None
            self.log(
                f"pulls {sum(self.stats.pulls.values())}, failures {len(self.stats.failures)}, "
                f"{sum(self.stats.bytes.values()) / MiB:.0f} MiB"
                + (f", fds {last.fds}, RSS {last.rss_mib:.0f} MiB" if last else "")
            )


class PullError(Exception):
    pass


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pullable(image: Image, repo: str, release: float) -> Pullable:
    digests = [d for d in (image.config_digest, *image.layer_digests) if d]
    blobs = [Blob(d, image.blob_path(d).stat().st_size) for d in digests]
    return Pullable(repo, "v1", image.manifest_digest, blobs, release)


def measure(pid: int, t: float, phase: str, slowloris_open: int) -> Sample:
    """Open fds and RSS summed over the edgeproxy master and its workers."""
    fds = 0
    rss_kib = 0
    pids = process_tree(pid)
    for each in pids:
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{each}/fd"))
            status = Path(f"/proc/{each}/status").read_text()
            if match := re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE):
                rss_kib += int(match.group(1))
    return Sample(round(t, 1), phase, fds, rss_kib / 1024, len(pids), slowloris_open)


@dataclass
class UpstreamCounts:
    """What the upstream answered with 200: GETs of each blob and of each manifest, and the
    HEADs of tags (the mirror's revalidations)."""

    blobs: Counter[str] = field(default_factory=Counter)
    manifests: Counter[str] = field(default_factory=Counter)
    tag_heads: int = 0


def upstream_counts(upstream: Registry) -> UpstreamCounts:
    counts = UpstreamCounts()
    for entry in upstream.access_log():
        kind, _, reference = entry.path.rpartition("/")
        if entry.status != 200:
            continue
        if entry.method == "HEAD" and kind.endswith("/manifests") and ":" not in reference:
            counts.tag_heads += 1
        elif entry.method != "GET":
            continue
        elif kind.endswith("/blobs"):
            counts.blobs[reference] += 1
        elif kind.endswith("/manifests"):
            counts.manifests[reference] += 1
    return counts


# The seed's log_format: [$time_local] "$request" ... $request_time at the end of the line.
_MANIFEST_LINE = re.compile(r'\[([^\]]+)\] "GET /v2/\S+/manifests/\S+ HTTP/1\.1" .* ([\d.]+) $')


def edge_manifest_ms(soak: Soak, access_log: Path) -> dict[str, list[float]]:
    """$request_time of each manifest GET in the edge's access log, by phase: what the edge
    took, without the wait inside the busy client process."""
    half = soak.started_wall + soak.args.duration / 2
    by_phase: dict[str, list[float]] = {}
    for line in access_log.read_text(errors="replace").splitlines():
        if match := _MANIFEST_LINE.search(line):
            logged = datetime.datetime.strptime(match[1], "%d/%b/%Y:%H:%M:%S %z").timestamp()
            phase = "load" if logged < half else "slowloris"
            by_phase.setdefault(phase, []).append(1000 * float(match[2]))
    return by_phase


# Report


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: list[float]) -> str:
    return f"{min(values):.0f} / {statistics.median(values):.0f} / {max(values):.0f}"


def report(
    soak: Soak,
    upstream: UpstreamCounts,
    edge_ms: dict[str, list[float]],
    after: Sample,
    cache: tuple[int, list[str], list[str]],
    command: str,
) -> str:
    args, stats = soak.args, soak.stats
    expected = {b.digest for image in soak.images for b in image.blobs}
    blobs, manifests = upstream.blobs, upstream.manifests
    pulled = {d for d in expected if blobs[d]}
    load = [s for s in soak.samples if s.phase == "load"]
    slow = [s for s in soak.samples if s.phase == "slowloris" and s.slowloris_open]
    failed = len(stats.failures)
    lines = [
        "# Soak results (generated by `bench/soak`; do not edit)",
        "",
        f"- When: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; command: `{command}`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {platform.platform()}; other sessions were using "
        "the same CPUs",
        f"- Setup: {args.clients} client connections (aiohttp, one keep-alive connection each, "
        f"TLS) in one process pull whole images (manifest by tag, config, 5 layers; every body "
        f"digest-checked) for {args.duration} s through `[edge]` https + `[edge.tls]`, backend "
        f"`embedded`, `workers` auto, the seed's access log to a file; the upstream is Debian's "
        f"docker-registry on loopback, {args.images} images of 5 random layers up to "
        f"{args.max_layer_mib} MiB, one more released every {args.duration * 0.6 / args.images:.0f}"
        f" s (cold) while the others are warm. From {args.duration / 2:.0f} s on, "
        f"{args.slowloris} slowloris connections (TLS, half a request head, one more header line "
        "every 10 s) are held open as well.",
        "",
        "| figure | load only | with slowloris |",
        "| --- | --- | --- |",
    ]

    def row(name: str, load_value: str, slow_value: str) -> None:
        lines.append(f"| {name} | {load_value} | {slow_value} |")

    half = args.duration / 2
    row("whole pulls completed", str(stats.pulls["load"]), str(stats.pulls["slowloris"]))
    row(
        "requests / s",
        f"{stats.requests['load'] / half:.0f}",
        f"{stats.requests['slowloris'] / half:.0f}",
    )
    row(
        "blob MB/s (digest-checked)",
        f"{stats.bytes['load'] / half / 1e6:.0f}",
        f"{stats.bytes['slowloris'] / half / 1e6:.0f}",
    )
    for seen_by, figures in (("clients", stats.manifest_ms), ("edge", edge_ms)):
        for q in (0.5, 0.99):
            row(
                f"manifest latency p{int(q * 100)} (ms), {seen_by}",
                f"{percentile(figures.get('load', []), q):.0f}",
                f"{percentile(figures.get('slowloris', []), q):.0f}",
            )
    row(
        "open fds, min / median / max (all edgeproxy processes)",
        spread([s.fds for s in load]) if load else "—",
        spread([s.fds for s in slow]) if slow else "—",
    )
    row(
        "RSS MiB, min / median / max (sum)",
        spread([s.rss_mib for s in load]) if load else "—",
        spread([s.rss_mib for s in slow]) if slow else "—",
    )
    lines += [
        "",
        f"- Failed or corrupt pulls: **{failed}**"
        + (" (first: " + "; ".join(stats.failures[:3]) + ")" if failed else ""),
        "- Blob responses by Cache-Status: "
        + ", ".join(f"`{k}` {v}" for k, v in sorted(stats.cache.items())),
        f"- Upstream GETs per blob (registry access log, 200s): {len(pulled)} of "
        f"{len(expected)} blobs fetched; counts {dict(sorted(Counter(blobs.values()).items()))} "
        f"(count → number of blobs); blobs fetched more than once: "
        f"{sorted(d for d in pulled if blobs[d] > 1) or 'none'}",
        f"- Upstream manifest GETs: {sum(manifests.values())} for {len(manifests)} references; "
        f"tag HEADs: {upstream.tag_heads} for {sum(len(v) for v in edge_ms.values())} manifest "
        "GETs by tag at the edge (tag_ttl 0: every request revalidates, sharing a HEAD that is "
        "already out)",
        "- Manifest latency: the clients' figures include the wait inside their one process "
        "(it digest-checks every blob); the edge's are `$request_time` from its access log",
        f"- Slowloris: {soak.slowloris_opened} opened, {soak.slowloris_closed_by_server} closed by "
        "the server before the end",
        f"- After the run (clients and slowloris gone, {args.settle} s later): {after.fds} fds, "
        f"{after.rss_mib:.0f} MiB RSS in {after.processes} processes",
        f"- Cache check (re-hash of every blob): {cache[0]} blobs, corrupt {cache[1] or 'none'}, "
        f"spool leftovers {cache[2] or 'none'}",
        "",
        "## Samples",
        "",
        "| t (s) | phase | open fds | RSS MiB | processes | slowloris open |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in soak.samples:
        lines.append(
            f"| {s.t:.0f} | {s.phase} | {s.fds} | {s.rss_mib:.0f} | {s.processes} | "
            f"{s.slowloris_open} |"
        )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="edgeproxy-soak-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=240, help="seconds of load (240)")
    parser.add_argument("--clients", type=int, default=200, help="client connections (200)")
    parser.add_argument("--slowloris", type=int, default=1000, help="slowloris connections")
    parser.add_argument("--images", type=int, default=12, help="images in the upstream (12)")
    parser.add_argument("--max-layer-mib", type=int, default=6, help="largest layer (6 MiB)")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds (10)")
    parser.add_argument(
        "--settle",
        type=float,
        default=2 * QUIET_CHECK + 5,
        help="seconds before the last look (25: a worker gives memory back at its first look,"
        " every 10 s, that finds no request running)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite bench/SOAK.md")
    args = parser.parse_args(argv)
    command = shlex.join(["bench/soak", *(argv if argv is not None else sys.argv[1:])])
    with workdir(args.keep) as work:
        soak = Soak(args, work)
        soak.started = time.monotonic()
        upstream = start_registry(work / "upstream")
        try:
            soak.build_and_push(upstream)
            upstreams = [{"name": "registry.local", "url": upstream.url}]
            with run_edge(work / "edge", upstreams) as edge:
                soak.log(f"edge on {edge.https_url}, pid {edge.process.pid}")
                asyncio.run(soak.run(edge))
                time.sleep(args.settle)
                after = measure(edge.process.pid, args.duration + args.settle, "after", 0)
            counts = upstream_counts(upstream)
            edge_ms = edge_manifest_ms(soak, edge.access_log)
        finally:
            upstream.close()
        report_cache = verify_cache(work / "edge" / "cache")
        text = report(
            soak,
            counts,
            edge_ms,
            after,
            (report_cache.blobs, report_cache.corrupt, report_cache.leftovers),
            command,
        )
    print(text)
    if not args.no_write:
        SOAK.write_text(text)
    return 1 if soak.stats.failures or report_cache.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())

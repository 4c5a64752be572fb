"""edgeproxy against registry:2 in proxy mode, both mirroring the same real upstream, measured
side by side in one run; prints a table of ratios and writes bench/RESULTS.md.

Run it as `bench/run [options]` (root: the bandwidth-limited row needs a network namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal, NoReturn

from bench.harness import (
    STORE_TIMEOUT,
    BaselineMirror,
    BenchError,
    EdgeproxyMirror,
    Mirror,
    NamespacedUpstream,
    OtherLoad,
    RssMonitor,
    create_shaped_link,
    fetch,
    fetch_many,
    page_cache_write_cost,
    page_reporting_kib,
    remove_shaped_link,
    settle,
    tree_cpu_seconds,
    wait_cached,
    wait_stored,
    wrk,
)
from tests.support.edge import run_edge
from tests.support.images import Image, RandomLayer, build_image, push
from tests.support.nginx import run_nginx
from tests.support.registry import Registry, start_registry

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MiB = 1 << 20
GiB = 1 << 30
BIG_REPO, MID_REPO, TAG = "bench/big", "bench/mid", "v1"
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
RSS_TARGET_MB = 200.0
PROFILE_HZ = 200


@dataclass
class Row:
    """One line of the table: per-round figures of each mirror, compared by their medians."""

    name: str
    unit: str
    better: Literal["higher", "lower"]
    target: str = "—"
    met: Callable[[float, float, float], bool] | None = None  # (baseline, edgeproxy, ratio)
    baseline: list[float] = field(default_factory=list)
    edgeproxy: list[float] = field(default_factory=list)
    error: str | None = None

    def add(self, mirror: Mirror, value: float) -> None:
        """One round's figure of `mirror`."""
        (self.baseline if isinstance(mirror, BaselineMirror) else self.edgeproxy).append(value)

    def medians(self) -> tuple[float | None, float | None]:
        return _median(self.baseline), _median(self.edgeproxy)

    def ratio(self) -> float | None:
        """>1 means edgeproxy is better: edgeproxy/baseline, or baseline/edgeproxy if lower wins."""
        base, edge = self.medians()
        if base is None or edge is None or min(base, edge) <= 0:
            return None
        return edge / base if self.better == "higher" else base / edge

    def verdict(self) -> str:
        base, edge = self.medians()
        ratio = self.ratio()
        if self.met is None or base is None or edge is None or ratio is None:
            return "—"
        return "yes" if self.met(base, edge, ratio) else "NO"


def ratio_at_least(
    name: str,
    unit: str,
    better: Literal["higher", "lower"],
    minimum: float,
    aim: float | None = None,
) -> Row:
    """A row whose target is edgeproxy at `minimum` times the baseline or better."""
    target = f">= {minimum}x" + (f" (aim {aim}x)" if aim is not None else "")
    return Row(name, unit, better, target, lambda base, edge, ratio: ratio >= minimum)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Bench:
    """The state shared by the rows: options, upstream, images, mirrors, results."""

    args: argparse.Namespace
    work: Path
    stack: contextlib.ExitStack
    monitor: RssMonitor
    load: OtherLoad
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    upstream: Registry | None = None
    big: Image | None = None
    mid: Image | None = None
    mirrors: list[Mirror] = field(default_factory=list)
    profiles: list[tuple[str, list[str]]] = field(default_factory=list)
    reported_kib: int | None = None  # free page reporting's count when the rows began
    rss_by_row: list[str] = field(default_factory=list)  # the rows that raised a peak RSS
    _others: float = 0.0

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:5.0f}s] {message}", file=sys.stderr, flush=True)

    def record(self, message: str) -> None:
        """A per-round figure: logged now, listed in RESULTS.md, with the CPU time other
        processes took since the previous one."""
        others, self._others = self._others, self.load.total()
        message += f" [others {self._others - others:.1f} CPU-s]"
        self.log(message)
        self.raw.append(message)

    def mark(self) -> None:
        """Start counting other processes' CPU time from now (for the next `record`)."""
        self._others = self.load.total()

    def row(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def rounds(self, mirrors: list[Mirror]) -> Iterator[tuple[int, Mirror]]:
        """Interleaved rounds; the order of the mirrors alternates from one round to the next."""
        for index in range(self.args.rounds):
            for mirror in mirrors if index % 2 == 0 else mirrors[::-1]:
                yield index + 1, mirror


def blob_url(mirror_url: str, repo: str, digest: str) -> str:
    return f"{mirror_url}/v2/{repo}/blobs/{digest}"


def layer(image: Image | None) -> tuple[str, int]:
    """The digest and size of the image's only layer."""
    assert image is not None
    digest = image.layer_digests[0]
    return digest, image.blob_path(digest).stat().st_size


def setup(bench: Bench) -> None:
    """Build the two images (random, incompressible layers), push them to a fresh upstream,
    start both mirrors of it."""
    args = bench.args
    layout = bench.work / "layout"
    bench.log(f"building images: {args.big_mib} MiB and {args.mid_mib} MiB random layers")
    bench.big = build_image(layout, "big", [RandomLayer(args.big_mib * MiB, seed=1)])
    bench.mid = build_image(layout, "mid", [RandomLayer(args.mid_mib * MiB, seed=2)])
    upstream = start_registry(bench.work / "upstream")
    bench.stack.callback(upstream.close)
    bench.upstream = upstream
    bench.log(f"pushing to the upstream {upstream.url}")
    push(bench.big, upstream, BIG_REPO, TAG)
    push(bench.mid, upstream, MID_REPO, TAG)
    os.sync()  # the pushed gigabytes' writeback must not land in the first round
    fresh, reused = page_cache_write_cost(bench.work, args.big_mib)
    bench.notes.append(
        f"Page cache here: writing {args.big_mib} MiB into a new file took {fresh:.2f} CPU-s"
        f" after 6 s idle, {reused:.2f} CPU-s right after (into the pages the first file"
        " freed). The gap is the VM's free page reporting (bench/README.md): a cold fill writes"
        " its blob into such pages while its client waits; registry:2 writes after."
    )
    os.sync()
    for image, repo in ((bench.big, BIG_REPO), (bench.mid, MID_REPO)):
        digest, size = layer(image)
        bench.notes.append(f"`{repo}:{TAG}` layer {digest} = {size} bytes")
    bench.log("starting the mirrors")
    baseline = BaselineMirror(bench.work / "baseline", upstream.url, bench.monitor)
    bench.stack.callback(baseline.stop)
    edgeproxy = EdgeproxyMirror(bench.work / "edgeproxy", upstream.url, bench.monitor)
    bench.stack.callback(edgeproxy.stop)
    bench.mirrors = [baseline, edgeproxy]
    bench.reported_kib = page_reporting_kib()
    bench.mark()


def row_blob(bench: Bench) -> None:
    """1. One big blob: cold MB/s (fresh cache each round), warm MB/s, upstream GETs per cold."""
    assert bench.upstream is not None
    digest, size = layer(bench.big)
    label = f"{bench.args.big_mib} MiB blob"
    cold = bench.row(ratio_at_least(f"{label}, cold (MB/s)", "MB/s", "higher", 1.0, aim=1.2))
    warm = bench.row(ratio_at_least(f"{label}, warm (MB/s)", "MB/s", "higher", 1.0))
    gets = bench.row(
        Row(
            "upstream GETs per cold fetch",
            "",
            "lower",
            "edgeproxy = 1",
            lambda base, edge, ratio: edge == 1,
        )
    )
    cached = bench.row(Row("cold fetch until the blob is cached (s)", "s", "lower"))
    cpu = bench.row(Row("mirror CPU per cold fetch, incl. storing (s)", "s", "lower"))
    statuses: set[str] = set()
    for index, mirror in bench.rounds(bench.mirrors):
        mirror.restart_fresh()
        before = bench.upstream.count("GET", f"/blobs/{digest}")
        cpu_before = mirror.cpu_seconds()
        started = time.monotonic()
        first = fetch(blob_url(mirror.url, BIG_REPO, digest), size=size)
        until_cached = wait_cached(mirror, digest, size, started + STORE_TIMEOUT) - started
        count = settle(mirror, bench.upstream, digest, size) - before
        used = mirror.cpu_seconds() - cpu_before
        second = fetch(blob_url(mirror.url, BIG_REPO, digest), size=size)
        for row, value in (
            (cold, first.mb_per_s),
            (warm, second.mb_per_s),
            (gets, count),
            (cached, until_cached),
            (cpu, used),
        ):
            row.add(mirror, value)
        if mirror.kind == "edgeproxy":
            statuses.add(f"cold `{first.headers.get('cache-status')}`")
            statuses.add(f"warm `{second.headers.get('cache-status')}`")
        bench.record(
            f"round {index} {mirror.kind}: cold {first.mb_per_s:.0f} MB/s ({first.seconds:.2f} s),"
            f" warm {second.mb_per_s:.0f} MB/s, upstream GETs {count}, cached after"
            f" {until_cached:.2f} s, mirror CPU {used:.2f} s"
        )
    bench.notes.append("edgeproxy Cache-Status seen: " + ", ".join(sorted(statuses)))


def row_concurrent(bench: Bench) -> None:
    """2. N clients of one cold blob at once: wall time until all are done, upstream GETs."""
    assert bench.upstream is not None
    big = bench.args.concurrent_blob == "big"
    image, repo = (bench.big, BIG_REPO) if big else (bench.mid, MID_REPO)
    mib = bench.args.big_mib if big else bench.args.mid_mib
    digest, size = layer(image)
    clients = bench.args.clients
    wall = bench.row(
        Row(
            f"{clients} cold clients of a {mib} MiB blob: wall (s)",
            "s",
            "lower",
            "edgeproxy faster",
            lambda base, edge, ratio: edge < base,
        )
    )
    gets = bench.row(
        Row(
            f"upstream GETs for {clients} cold clients",
            "",
            "lower",
            "edgeproxy = 1",
            lambda base, edge, ratio: edge == 1,
        )
    )
    for index, mirror in bench.rounds(bench.mirrors):
        mirror.restart_fresh()
        before = bench.upstream.count("GET", f"/blobs/{digest}")
        cpu_before = mirror.cpu_seconds()
        seconds, fetches = fetch_many(blob_url(mirror.url, repo, digest), clients, size)
        count = settle(mirror, bench.upstream, digest, size) - before
        used = mirror.cpu_seconds() - cpu_before
        for row, value in ((wall, seconds), (gets, count)):
            row.add(mirror, value)
        slowest = max(f.seconds for f in fetches)
        bench.record(
            f"round {index} {mirror.kind}: {clients} clients in {seconds:.2f} s"
            f" (slowest curl {slowest:.2f} s), upstream GETs {count}, mirror CPU {used:.2f} s"
        )


def row_manifests(bench: Bench) -> None:
    """3. Warm manifest GETs by tag and by digest under wrk (32 connections)."""
    assert bench.big is not None and bench.upstream is not None
    digest = bench.big.manifest_digest
    seconds = bench.args.wrk_seconds
    by_tag = bench.row(Row("manifest by tag (req/s)", "req/s", "higher"))
    by_digest = bench.row(ratio_at_least("manifest by digest (req/s)", "req/s", "higher", 10))
    paths = {
        "tag": f"/v2/{BIG_REPO}/manifests/{TAG}",
        "digest": f"/v2/{BIG_REPO}/manifests/{digest}",
    }
    for mirror in bench.mirrors:  # warm: pull once first
        for path in paths.values():
            answer = fetch(mirror.url + path, accept=MANIFEST_ACCEPT)
            if answer.headers.get("docker-content-digest") != digest:
                raise BenchError(f"{mirror.kind} {path}: digest {answer.headers}")
    heads = paths["tag"].removeprefix(f"/v2/{BIG_REPO}")  # the upstream's log: its own name
    for index, mirror in bench.rounds(bench.mirrors):
        for kind, row in (("tag", by_tag), ("digest", by_digest)):
            heads_before = bench.upstream.count("HEAD", heads)
            cpu_before, started = mirror.cpu_seconds(), time.monotonic()
            result = wrk(mirror.url + paths[kind], MANIFEST_ACCEPT, seconds)
            elapsed = time.monotonic() - started
            cores = (mirror.cpu_seconds() - cpu_before) / elapsed
            row.add(mirror, result.requests_per_s)
            problems = f", non-2xx {result.non_2xx}" if result.non_2xx else ""
            if result.socket_errors:
                problems += f", socket errors: {result.socket_errors}"
            rate = f"{result.requests_per_s:.0f} req/s, mirror CPU {cores:.2f} cores"
            if kind == "tag":  # a HEAD per request, or one shared by the requests that wait
                asked = bench.upstream.count("HEAD", heads) - heads_before
                rate += f", upstream HEADs {asked / elapsed:.0f}/s"
            bench.record(f"round {index} {mirror.kind} by {kind}: {rate}{problems}")


def row_edge(bench: Bench) -> None:
    """6-8. The TLS edge against nginx with the seed's config (TLS, same self-signed certificate,
    worker_processes auto like edgeproxy's workers default) in front of the registry:2 baseline:
    edgeproxy's embedded backend (warm big blob, manifest by digest under wrk), and edgeproxy
    pointing to the same registry:2 (warm big blob). In the table's registry:2 column: nginx."""
    assert bench.upstream is not None and bench.big is not None
    baseline = bench.mirrors[0]
    digest, size = layer(bench.big)
    label = f"{bench.args.big_mib} MiB blob"
    warm = bench.row(
        ratio_at_least(
            f"TLS edge, embedded vs nginx+registry:2: warm {label} (MB/s)", "MB/s", "higher", 1.0
        )
    )
    manifests = bench.row(
        ratio_at_least(
            "TLS edge, embedded vs nginx+registry:2: manifest by digest (req/s)",
            "req/s",
            "higher",
            1.0,
        )
    )
    points_to = bench.row(
        ratio_at_least(
            f"TLS edge, points-to registry:2 vs nginx+registry:2: warm {label} (MB/s)",
            "MB/s",
            "higher",
            0.9,
        )
    )
    # The machine may be shared: the proxy's own CPU time per GiB says more than MB/s then.
    points_to_cpu = bench.row(
        Row(
            "TLS edge, points-to registry:2 vs nginx+registry:2: proxy CPU per GiB (s)",
            "s",
            "lower",
        )
    )
    upstreams = [{"name": "docker.io", "url": bench.upstream.url}]
    blob = f"/v2/{BIG_REPO}/blobs/{digest}"
    manifest = f"/v2/{BIG_REPO}/manifests/{bench.big.manifest_digest}"
    with contextlib.ExitStack() as stack:  # stops nginx and both edgeproxies (process groups)
        embedded = stack.enter_context(
            run_edge(bench.work / "edge-embedded", upstreams, access_log="off")
        )
        assert embedded.certificate is not None
        key = embedded.certificate.with_name("server.key")
        nginx_port = stack.enter_context(
            run_nginx(
                bench.work / "nginx",
                baseline.url,
                tls=(embedded.certificate, key),
                workers="auto",
            )
        )
        pointing = stack.enter_context(
            run_edge(
                bench.work / "edge-points-to", upstreams, access_log="off", backend=baseline.url
            )
        )
        nginx = f"https://127.0.0.1:{nginx_port}"
        ends = {"nginx": nginx, "embedded": embedded.https_url, "points-to": pointing.https_url}
        pids = {
            "nginx": int((bench.work / "nginx" / "nginx.pid").read_text()),
            "embedded": embedded.process.pid,
            "points-to": pointing.process.pid,
        }
        for name, url in ends.items():  # warm-up: one fetch through each, stored before timing
            fetch(url + blob, size=size, insecure=True)
            if name == "embedded":
                root = bench.work / "edge-embedded" / "cache"
                wait_stored(root, digest, size, time.monotonic() + STORE_TIMEOUT)
            else:
                settle(baseline, bench.upstream, digest, size)
            answer = fetch(url + manifest, accept=MANIFEST_ACCEPT, insecure=True)
            if answer.headers.get("docker-content-digest") != bench.big.manifest_digest:
                raise BenchError(f"{name} {manifest}: digest {answer.headers}")
        bench.mark()
        for index in range(1, bench.args.rounds + 1):
            order = list(ends) if index % 2 else list(ends)[::-1]
            for name in order:
                before = tree_cpu_seconds(pids[name])
                result = fetch(ends[name] + blob, size=size, insecure=True)
                cpu = (tree_cpu_seconds(pids[name]) - before) / (size / GiB)
                if name == "nginx":
                    warm.baseline.append(result.mb_per_s)
                    points_to.baseline.append(result.mb_per_s)
                    points_to_cpu.baseline.append(cpu)
                else:
                    (warm if name == "embedded" else points_to).edgeproxy.append(result.mb_per_s)
                    if name == "points-to":
                        points_to_cpu.edgeproxy.append(cpu)
                bench.record(
                    f"round {index} TLS {name}: warm {result.mb_per_s:.0f} MB/s"
                    f" ({result.seconds:.2f} s), {cpu:.2f} CPU-s per GiB"
                )
            for name in ("nginx", "embedded") if index % 2 else ("embedded", "nginx"):
                rate = wrk(ends[name] + manifest, MANIFEST_ACCEPT, bench.args.wrk_seconds)
                values = manifests.baseline if name == "nginx" else manifests.edgeproxy
                values.append(rate.requests_per_s)
                problems = f", non-2xx {rate.non_2xx}" if rate.non_2xx else ""
                if rate.socket_errors:
                    problems += f", socket errors: {rate.socket_errors}"
                bench.record(
                    f"round {index} TLS {name} manifest by digest: "
                    f"{rate.requests_per_s:.0f} req/s{problems}"
                )
    bench.notes.append(
        "TLS edge rows: the registry:2 column is nginx 1.22 with the seed's config (TLS, "
        "`worker_processes auto`, access_log off) proxying to the registry:2 baseline; edgeproxy "
        "is `[edge]` https + `[edge.tls]` (a certificate from `edgeproxy certs self-signed`, "
        "shared by both), workers default (auto), access_log off; `curl -k`, one warm-up fetch "
        "through each first. The nginx warm figures serve as the baseline of both blob rows. "
        "CPU per GiB: user+system time of the proxy's process tree (nginx's or edgeproxy's "
        "master and workers) during the fetch, per GiB sent."
    )


def row_shaped(bench: Bench) -> None:
    """5. A cold blob through each mirror from an upstream behind a tbf-limited veth pair."""
    assert bench.upstream is not None
    digest, size = layer(bench.mid)
    rate = bench.args.rate
    row = bench.row(
        ratio_at_least(
            f"{rate} upstream, cold {bench.args.mid_mib} MiB (MB/s)", "MB/s", "higher", 1.8
        )
    )
    try:
        link = create_shaped_link(rate)
    except BenchError as exc:
        row.error = f"skipped: cannot create the network namespace: {exc}"
        bench.log(row.error)
        return
    with contextlib.ExitStack() as stack:
        stack.callback(remove_shaped_link, link)
        upstream = NamespacedUpstream(link, bench.upstream.root, bench.work / "upstream-shaped")
        stack.callback(upstream.stop)
        bench.log(f"shaped upstream {upstream.url} in netns {link.namespace}, tbf {rate}")
        baseline = BaselineMirror(bench.work / "baseline-shaped", upstream.url, bench.monitor)
        stack.callback(baseline.stop)
        edgeproxy = EdgeproxyMirror(bench.work / "edgeproxy-shaped", upstream.url, bench.monitor)
        stack.callback(edgeproxy.stop)
        direct: list[float] = []
        for index in range(1, bench.args.rounds + 1):
            order = [baseline, edgeproxy] if index % 2 else [edgeproxy, baseline]
            for mirror in order:
                mirror.restart_fresh()
                before = upstream.log.count("GET", f"/blobs/{digest}")
                result = fetch(blob_url(mirror.url, MID_REPO, digest), size=size)
                count = settle(mirror, upstream.log, digest, size) - before
                row.add(mirror, result.mb_per_s)
                bench.record(
                    f"round {index} {mirror.kind} via {rate}: {result.mb_per_s:.1f} MB/s"
                    f" ({result.seconds:.2f} s), upstream GETs {count}"
                )
            direct.append(fetch(blob_url(upstream.url, MID_REPO, digest), size=size).mb_per_s)
            bench.record(
                f"round {index} curl straight from the shaped upstream: {direct[-1]:.1f} MB/s"
            )
        bench.notes.append(
            f"{rate} link, curl straight from the shaped upstream: median "
            f"{statistics.median(direct):.1f} MB/s"
        )


def row_rss(bench: Bench) -> None:
    """4. Peak RSS of each mirror over the whole run."""
    for mirror in bench.mirrors:
        mirror.stop()
    bench.monitor.sample()
    row = bench.row(
        Row(
            "peak RSS over the run (MB)",
            "MB",
            "lower",
            f"edgeproxy < {RSS_TARGET_MB:.0f} MB",
            lambda base, edge, ratio: edge < RSS_TARGET_MB,
        )
    )
    pss = bench.row(Row("peak PSS over the run, sampled (MB)", "MB", "lower"))
    for kind, values, pss_values in (
        ("registry:2", row.baseline, pss.baseline),
        ("edgeproxy", row.edgeproxy, pss.edgeproxy),
    ):
        if kind in bench.monitor.peak_kib:
            values.append(bench.monitor.peak_kib[kind] * 1024 / 1e6)
        if kind in bench.monitor.peak_pss_kib:
            pss_values.append(bench.monitor.peak_pss_kib[kind] * 1024 / 1e6)


def profile(bench: Bench) -> None:
    """py-spy profiles of edgeproxy (not figures): one more cold fetch of the big blob, and
    wrk on the manifest by digest."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        bench.notes.append("no profile: py-spy not installed (`.venv/bin/pip install py-spy`)")
        return
    assert bench.big is not None
    edgeproxy = bench.mirrors[1]
    digest, size = layer(bench.big)
    edgeproxy.restart_fresh()
    with py_spy_record(py_spy, edgeproxy, bench.work / "profile-cold.txt") as result:
        cold = fetch(blob_url(edgeproxy.url, BIG_REPO, digest), size=size)
    title = f"a cold fetch of the {bench.args.big_mib} MiB blob, {cold.mb_per_s:.0f} MB/s"
    bench.profiles.append((title, summarize_profile(result.read(), cold.seconds)))
    path = f"/v2/{BIG_REPO}/manifests/{bench.big.manifest_digest}"
    fetch(edgeproxy.url + path, accept=MANIFEST_ACCEPT)
    seconds = bench.args.wrk_seconds
    with py_spy_record(py_spy, edgeproxy, bench.work / "profile-manifest.txt") as result:
        rate = wrk(edgeproxy.url + path, MANIFEST_ACCEPT, seconds).requests_per_s
    title = f"wrk on the manifest by digest, {rate:.0f} req/s"
    bench.profiles.append((title, summarize_profile(result.read(), seconds)))
    for title, lines in bench.profiles:
        bench.log(f"profile of {title}:\n" + "\n".join(lines))


@dataclass
class Recording:
    """What py-spy wrote, once the `with` is over."""

    output: Path
    errors: str = ""

    def read(self) -> str:
        if not self.output.exists():
            raise BenchError(f"py-spy wrote nothing: {self.errors.strip()[-300:]}")
        return self.output.read_text()


@contextlib.contextmanager
def py_spy_record(py_spy: str, mirror: Mirror, output: Path) -> Iterator[Recording]:
    """`py-spy record` (200 Hz, per thread, without pausing the process) around the body, of
    the mirror's process and its children: the workers serve, the master only watches them."""
    assert mirror.pid is not None
    command = [py_spy, "record", "--pid", str(mirror.pid), "--rate", str(PROFILE_HZ)]
    command += ["--format", "raw", "--threads", "--subprocesses", "--nonblocking"]
    command += ["--output", str(output)]
    recorder = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    recording = Recording(output)
    try:
        time.sleep(1.0)  # py-spy attaches
        yield recording
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            _, recording.errors = recorder.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()


def summarize_profile(collapsed: str, seconds: float, top: int = 12) -> list[str]:
    """Busy time per thread, then the functions with the most samples on top of the stack
    (self) and anywhere on it (total). A frame's self time includes the C it calls."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: dict[str, Counter[str]] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, frames = _thread_and_frames(stack)
        if not frames:
            continue
        frames = [_frame(frame) for frame in frames]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
        threads.setdefault(thread, Counter())[frames[-1]] += count
    if not samples:
        return ["no samples"]
    lines = [
        f"time on or waiting for a CPU (py-spy's 'active') per thread, {seconds:.1f} s measured"
        " (+1 s of attaching), and the thread's top function:"
    ]
    for name, leaves in sorted(threads.items(), key=lambda item: -item[1].total()):
        busy = leaves.total()
        leaf, count = leaves.most_common(1)[0]
        lines.append(
            f"  {name}: {busy / PROFILE_HZ:.2f} s, {100 * count / busy:.0f}% of it in {leaf}"
        )
    lines += [f"{samples} samples at {PROFILE_HZ} Hz", "self%  total%  function"]
    for frame, count in own.most_common(top):
        lines.append(f"{100 * count / samples:5.1f}  {100 * total[frame] / samples:6.1f}  {frame}")
    return lines


def _thread_and_frames(stack: str) -> tuple[str, list[str]]:
    """A raw stack of `py-spy record --subprocesses --threads`, `process P:"cmd";` once per
    process from the one named down to the sampled one, then `thread (T): name;frame;...`, as
    the sampled process's pid with the thread's name, and the frames."""
    parts = stack.split(";")
    pid = ""
    while parts and parts[0].startswith("process "):
        pid = parts.pop(0).removeprefix("process ").partition(":")[0]
    if not parts:
        return "", []
    thread = parts[0].partition(": ")[2] or parts[0]
    return (f"{pid} {thread}" if pid else thread), parts[1:]


def _frame(frame: str) -> str:
    """`function (path:line)` without the line and with a short path."""
    match = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame.strip())
    if match is None:
        return frame.strip()
    name, path = match.groups()
    path = re.sub(r".*/(site-packages|lib/python3\.\d+)/", "", path)
    path = path.replace(str(Path.cwd()) + "/", "")
    return f"{name} ({path})"


# Report


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "" or value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def table(rows: list[Row]) -> list[str]:
    """The results as a Markdown table (ratios >1 favour edgeproxy)."""
    lines = [
        "| row | registry:2 | edgeproxy | ratio | ratio is | target | met |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        base, edge = row.medians()
        ratio = row.ratio()
        kind = "edgeproxy/registry:2" if row.better == "higher" else "registry:2/edgeproxy"
        if row.error:
            lines.append(f"| {row.name} | — | — | — | — | {row.target} | {row.error} |")
            continue
        lines.append(
            f"| {row.name} | {_format(base, row.unit)} | {_format(edge, row.unit)} | "
            f"{'—' if ratio is None else f'{ratio:.2f}x'} | {kind} | {row.target} | "
            f"{row.verdict()} |"
        )
    return lines


def _command_version(*command: str) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    return (result.stdout or result.stderr).strip().splitlines()[0]


def machine() -> list[str]:
    """The machine and the versions the figures come from."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        memory = f"{int(match.group(1)) / 1024**2:.1f} GiB" if match else memory
    commit = _command_version("git", "rev-parse", "--short", "HEAD")
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "edgeproxy"], capture_output=True, text=True
    ).stdout
    return [
        f"- nproc: {_command_version('nproc')}",
        f"- CPU: {cpu}",
        f"- memory: {memory}",
        f"- kernel: {platform.release()}",
        f"- python: {platform.python_version()}",
        f"- uvicorn: {importlib.metadata.version('uvicorn')}",
        f"- aiohttp: {importlib.metadata.version('aiohttp')}",
        f"- docker-registry: {_command_version('docker-registry', '--version')}",
        f"- edgeproxy: {importlib.metadata.version('edgeproxy')} at git {commit}"
        + (" (edgeproxy/ has uncommitted changes)" if dirty else ""),
        f"- curl: {' '.join(_command_version('curl', '--version').split()[:2])}",
        f"- wrk: {' '.join(_command_version('wrk', '-v').split()[:2])}",
    ]


def report(bench: Bench, command: str, elapsed: float) -> str:
    args = bench.args
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Mirror benchmark: edgeproxy vs registry:2 (proxy mode)",
        "",
        f"{date}, `{command}`, {elapsed / 60:.1f} min.",
        "",
        "Both mirrors pull through the same upstream, a plain Debian `docker-registry` on "
        "loopback (row 5: the same storage served from a network namespace behind a "
        f"`tbf rate {args.rate}` veth pair). Figures are medians of {args.rounds} interleaved "
        "rounds (peak RSS: the maximum over the run); cold means the mirror was stopped, its "
        "cache wiped and started again. MB = 10^6 bytes; MB/s is what `curl -o /dev/null` saw. "
        f"Manifests: `wrk -t2 -c32 -d{args.wrk_seconds}s` with an OCI+Docker `Accept` header, "
        "after one warm-up pull (tag_ttl is edgeproxy's default 0s: every request by tag is "
        "revalidated upstream with a HEAD, as registry:2 does, but edgeproxy's requests that "
        "come while one is out share it; the log below gives the HEADs/s). Ratios above 1 "
        "favour edgeproxy.",
        "",
        *table(bench.rows),
        "",
        "## Notes",
        "",
        *[f"- {note}" for note in bench.notes],
        "- Peak RSS is VmHWM summed over the mirror process and its children, the highest of any "
        "instance (each cold round starts a new process). edgeproxy is a master and forked "
        "workers that share their interpreter and modules: summed RSS counts those pages once "
        "per process. Peak PSS (each shared page split between the processes that map it, "
        "sampled every 0.2 s) is what the tree really takes; registry:2 is one process, so "
        "its two figures differ only by sampling.",
        "",
        "## Per round",
        "",
        *[f"- {line}" for line in bench.raw],
        "",
        "## Machine",
        "",
        *machine(),
        "",
    ]
    for title, lines in bench.profiles:
        parts += [f"## Profile of edgeproxy: {title}", "", "```", *lines, "```", ""]
    return "\n".join(parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--big-mib", type=int, default=1024, help="row 1's blob (default 1024)")
    parser.add_argument(
        "--mid-mib", type=int, default=256, help="row 5's blob, row 2's with --concurrent-blob mid"
    )
    parser.add_argument("--clients", type=int, default=8, help="row 2's clients (default 8)")
    parser.add_argument(
        "--concurrent-blob",
        choices=["big", "mid"],
        default="big",
        help="row 2's blob: the --big-mib one (default) or the --mid-mib one",
    )
    parser.add_argument("--wrk-seconds", type=int, default=5, help="per wrk run (default 5)")
    parser.add_argument("--rate", default="400mbit", help="row 5's tbf rate (default 400mbit)")
    parser.add_argument("--no-netns", action="store_true", help="skip row 5")
    parser.add_argument(
        "--no-edge", action="store_true", help="skip the TLS edge rows (vs nginx+registry:2)"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument(
        "--only",
        choices=list(ROWS),
        help="run that row alone (after the setup) and print it; RESULTS.md is left as it is",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


# The rows in the order they run (the profile before the netns row, RSS last), by `--only` name.
ROWS: dict[str, tuple[str, Callable[[Bench], None]]] = {
    "blob": ("1: big blob, cold and warm", row_blob),
    "concurrent": ("2: concurrent cold clients", row_concurrent),
    "manifests": ("3: manifests", row_manifests),
    "edge": ("6-8: TLS edge vs nginx+registry:2", row_edge),
    "profile": ("profile", profile),
    "shaped": ("5: bandwidth-limited upstream", row_shaped),
    "rss": ("4: peak RSS", row_rss),
}


def steps(args: argparse.Namespace) -> list[tuple[str, Callable[[Bench], None]]]:
    """The rows to run: `--only` one, else all but those skipped."""
    if args.only:
        return [ROWS[args.only]]
    skipped = {"edge": args.no_edge, "profile": args.no_profile, "shaped": args.no_netns}
    return [step for name, step in ROWS.items() if not skipped.get(name)]


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["bench/run", *argv])
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="edgeproxy-bench-"))
    started = time.monotonic()
    load_before = Path("/proc/loadavg").read_text().split()[0]
    stack = contextlib.ExitStack()
    try:
        monitor = stack.enter_context(RssMonitor())
        load = stack.enter_context(OtherLoad())
        bench = Bench(args=args, work=work, stack=stack, monitor=monitor, load=load)
        bench.log(f"work directory {work}")
        setup(bench)
        for title, step in steps(args):
            bench.log(f"row {title}")
            before = dict(bench.monitor.peak_kib)
            try:
                step(bench)
            except (BenchError, subprocess.SubprocessError, OSError) as exc:
                bench.log(f"row {title} failed: {exc}")
                traceback.print_exc()
                bench.notes.append(f"row {title} failed: {str(exc).splitlines()[0]}")
            bench.monitor.sample()
            raised = {
                kind: f"{kib * 1024 / 1e6:.0f} MB"
                for kind, kib in bench.monitor.peak_kib.items()
                if kib > before.get(kind, 0)
            }
            if raised:
                bench.rss_by_row.append(f"{title}: {raised}")
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    elapsed = time.monotonic() - started
    if bench.rss_by_row:
        bench.notes.append("Peak RSS (summed VmHWM) raised by: " + "; ".join(bench.rss_by_row))
    reported_kib = page_reporting_kib()
    if bench.reported_kib is not None and reported_kib is not None:
        handed = (reported_kib - bench.reported_kib) / 2**20
        bench.notes.append(
            f"During the rows this VM's kernel handed {handed:.1f} GiB of freed memory back to"
            " its host (free page reporting, /sys/module/page_reporting): each page of it"
            " faults in host memory when used again."
        )
    bench.notes.append(
        f"Load average (1 min) at the start: {load_before}. Other processes during the run: "
        f"{bench.load.summary(elapsed)}; `others` in a per-round line is their CPU time then."
    )
    print("\n".join(table(bench.rows)))
    if args.only:
        print("\n".join(["", *bench.raw, *bench.notes]))
        print(f"\n{elapsed / 60:.1f} min; RESULTS.md left as it is (--only)")
        return 0
    RESULTS.write_text(report(bench, command, elapsed))
    print(f"\n{elapsed / 60:.1f} min; written to {RESULTS.relative_to(Path.cwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

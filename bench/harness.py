"""What the mirror benchmark drives: the two mirrors, a bandwidth-limited upstream in a network
namespace, peak-RSS sampling, and the clients (curl, wrk)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.ports import free_port, http_status
from tests.support.registry import Registry, start_registry
from tests.support.servers import write_toml

START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
STORE_TIMEOUT = 180.0  # registry:2 stores a cold blob in the background, after the client is done


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says why."""


# Processes


def stop_group(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process group of `process` (started with a session of its own), then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll `GET url` until it answers 200; raise with the log's tail if the process dies."""
    deadline = time.monotonic() + START_TIMEOUT
    while http_status(url) != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            stop_group(process)
            raise BenchError(f"{url} did not come up:\n{tail(log)}")
        time.sleep(0.05)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def blob_data_path(root: Path, digest: str) -> Path:
    """Where registry:2's layout (edgeproxy uses it too) keeps a committed blob."""
    hexdigest = digest.removeprefix("sha256:")
    return root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found: list[int] = []
    queue = [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                queue.extend(int(child) for child in children.read_text().split())
    return found


def vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set size (VmHWM) in KiB; 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def pss_kib(pid: int) -> int:
    """The process's proportional set size in KiB (a page shared by n processes counts 1/n:
    what a tree of forked processes really takes, where summed RSS counts shared pages in
    each); 0 if it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.MULTILINE)
    return int(match.group(1)) if match else 0


def pid_with_args(*args: str) -> int | None:
    """The pid of a running process whose argv contains all of `args`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(arg.encode() in argv for arg in args):
            return int(entry.name)
    return None


@dataclass(frozen=True)
class ProcStat:
    """What the benchmark reads from /proc/PID/stat."""

    name: str
    ppid: int
    cpu: float  # user + system seconds so far


def proc_stats() -> dict[int, ProcStat]:
    """Every user-space process (kernel threads left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if entry.name == "2" or fields[1] == "2":
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        cpu = (int(fields[11]) + int(fields[12])) / tick
        found[int(entry.name)] = ProcStat(name, int(fields[1]), cpu)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by `pid` and its living descendants."""
    stats = proc_stats()
    return sum(stats[p].cpu for p in process_tree(pid) if p in stats)


# Mirrors


class Mirror(ABC):
    """A pull-through cache under test, restartable with an empty cache."""

    kind: str

    def __init__(self, monitor: RssMonitor) -> None:
        self.monitor = monitor  # a subclass has it watch() the mirror once `pid` can answer

    @property
    @abstractmethod
    def url(self) -> str: ...

    @property
    @abstractmethod
    def root(self) -> Path:
        """The cache directory (registry:2's layout)."""

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """The mirror's main process, while it runs."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def _terminate(self) -> None: ...

    @abstractmethod
    def log_tail(self) -> str: ...

    def stop(self) -> None:
        """Record the process's peak RSS, then stop it (the cache is kept)."""
        if self.pid is not None:
            self.monitor.sample(self)
        self._terminate()

    def restart_fresh(self) -> None:
        """Stop, wipe the cache, start again: the next fetch is cold."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        os.sync()  # the last round's writeback must not run during this round's fetch
        self.start()

    def cpu_seconds(self) -> float:
        """CPU time used by the running mirror process (and its children) so far."""
        return 0.0 if self.pid is None else tree_cpu_seconds(self.pid)


class BaselineMirror(Mirror):
    """registry:2 (Debian's docker-registry) in proxy mode, from tests/support."""

    kind = "registry:2"

    def __init__(self, workdir: Path, upstream_url: str, monitor: RssMonitor) -> None:
        super().__init__(monitor)
        self.registry = start_registry(workdir, remote=upstream_url)
        self._pid = self._find_pid()
        monitor.watch(self)

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def root(self) -> Path:
        return self.registry.root

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self) -> None:
        self.registry.start()
        self._pid = self._find_pid()

    def _terminate(self) -> None:
        self._pid = None
        self.registry.stop()

    def log_tail(self) -> str:
        return self.registry.log_tail()

    def _find_pid(self) -> int | None:
        return pid_with_args("serve", str(self.registry.config_path))


class EdgeproxyMirror(Mirror):
    """`python -m edgeproxy.cli run --config proxy.toml`, one upstream named docker.io."""

    kind = "edgeproxy"

    def __init__(self, workdir: Path, upstream_url: str, monitor: RssMonitor) -> None:
        super().__init__(monitor)
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._root = workdir / "cache"
        self.log_path = workdir / "edgeproxy.log"
        mirror = {
            "root": str(self._root),
            "listen": f"127.0.0.1:{self.port}",
            "upstream": [{"name": "docker.io", "url": upstream_url}],
        }
        self.config_path = write_toml(workdir / "proxy.toml", {"mirror": mirror})
        self._process: subprocess.Popen[bytes] | None = None
        self.start()
        monitor.watch(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def root(self) -> Path:
        return self._root

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        if self._process is not None:
            raise BenchError("edgeproxy already running")
        command = [sys.executable, "-m", "edgeproxy.cli", "run", "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_ready(f"{self.url}/v2/", self._process, self.log_path)
        except BaseException:
            self._terminate()
            raise

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_group(process)

    def log_tail(self) -> str:
        return tail(self.log_path)


class _Periodic(ABC):
    """`sample()` in a thread of its own every `interval` seconds, while in a `with`."""

    def __init__(self, interval: float) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()

    @abstractmethod
    def sample(self) -> None: ...

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            self.sample()


class RssMonitor(_Periodic):
    """Peak RSS of each kind of mirror: VmHWM summed over its process tree, sampled in a thread
    and once more before every stop (VmHWM only grows while a process lives); and the peak of
    the tree's summed PSS over those samples."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(interval)
        self.peak_kib: dict[str, int] = {}
        self.peak_pss_kib: dict[str, int] = {}
        self._mirrors: list[Mirror] = []

    def watch(self, mirror: Mirror) -> None:
        with self._lock:
            self._mirrors.append(mirror)

    def sample(self, mirror: Mirror | None = None) -> None:
        with self._lock:
            for current in [mirror] if mirror is not None else list(self._mirrors):
                pid = current.pid
                if pid is None:
                    continue
                tree = process_tree(pid)
                total = sum(vm_hwm_kib(p) for p in tree)
                self.peak_kib[current.kind] = max(self.peak_kib.get(current.kind, 0), total)
                pss = sum(pss_kib(p) for p in tree)
                self.peak_pss_kib[current.kind] = max(self.peak_pss_kib.get(current.kind, 0), pss)


class OtherLoad(_Periodic):
    """CPU time used by processes that are not this benchmark's (the machine may be shared):
    sampled twice a second, so processes that live less than that go unseen."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(interval)
        self._first = {pid: stat for pid, stat in proc_stats().items() if pid != os.getpid()}
        self._last: dict[int, ProcStat] = {}

    def sample(self) -> None:
        stats = proc_stats()
        ours = {os.getpid()}
        for pid in sorted(stats):  # a child's pid is usually above its parent's
            if stats[pid].ppid in ours:
                ours.add(pid)
        for pid in sorted(stats):  # ... but not always: a second pass catches the rest
            if stats[pid].ppid in ours:
                ours.add(pid)
        with self._lock:
            for pid, stat in stats.items():
                if pid not in ours:
                    self._last[pid] = stat

    def _used(self) -> dict[int, tuple[str, float]]:
        used = {}
        for pid, stat in self._last.items():
            first = self._first.get(pid)
            start = first.cpu if first is not None and first.name == stat.name else 0.0
            used[pid] = (stat.name, stat.cpu - start)
        return used

    def total(self) -> float:
        """CPU seconds used by other processes since the start."""
        self.sample()
        with self._lock:
            return sum(cpu for _, cpu in self._used().values())

    def summary(self, seconds: float) -> str:
        """The other processes' share of the machine over `seconds`, the busiest by name."""
        with self._lock:
            by_name: dict[str, float] = {}
            for name, cpu in self._used().values():
                by_name[name] = by_name.get(name, 0.0) + cpu
        total = sum(by_name.values())
        share = 100 * total / (seconds * (os.cpu_count() or 1))
        busiest = sorted(((cpu, name) for name, cpu in by_name.items() if cpu >= 1), reverse=True)
        names = ", ".join(f"{name} {cpu:.0f} s" for cpu, name in busiest[:6])
        return f"{total:.0f} CPU-seconds, {share:.0f}% of the machine" + (
            f" ({names})" if names else ""
        )


# A bandwidth-limited upstream


@dataclass(frozen=True)
class ShapedLink:
    """A veth pair from this namespace into a new one, shaped with tbf in both directions."""

    namespace: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str
    rate: str


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")


def create_shaped_link(rate: str) -> ShapedLink:
    """Create the namespace, the veth pair (169.254.N.1/30 here, .2 there) and the qdiscs.

    Link-local addresses never leave the machine. On a failure, what was made is removed.
    """
    tag = os.getpid()
    subnet = f"169.254.{1 + tag % 250}"
    link = ShapedLink(
        namespace=f"epbench{tag}",
        host_if=f"epb{tag}h",
        ns_if=f"epb{tag}n",
        host_addr=f"{subnet}.1",
        ns_addr=f"{subnet}.2",
        rate=rate,
    )
    ns = ("ip", "netns", "exec", link.namespace)
    tbf = ("root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms")
    try:
        _run("ip", "netns", "add", link.namespace)
        _run("ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.ns_if)
        _run("ip", "link", "set", link.ns_if, "netns", link.namespace)
        _run("ip", "addr", "add", f"{link.host_addr}/30", "dev", link.host_if)
        _run("ip", "link", "set", link.host_if, "up")
        _run(*ns, "ip", "addr", "add", f"{link.ns_addr}/30", "dev", link.ns_if)
        _run(*ns, "ip", "link", "set", link.ns_if, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        _run("tc", "qdisc", "add", "dev", link.host_if, *tbf)
        _run(*ns, "tc", "qdisc", "add", "dev", link.ns_if, *tbf)
    except BaseException:
        remove_shaped_link(link)
        raise
    return link


def remove_shaped_link(link: ShapedLink) -> None:
    """Delete the veth pair and the namespace (what exists of them)."""
    for command in (
        ("ip", "link", "del", link.host_if),
        ("ip", "netns", "del", link.namespace),
    ):
        subprocess.run(command, capture_output=True, check=False)


class NamespacedUpstream:
    """A plain docker-registry inside the shaped namespace, serving an existing storage root."""

    PORT = 5000

    def __init__(self, link: ShapedLink, storage: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://{link.ns_addr}:{self.PORT}"
        # Only for its access-log parsing (`count`); this process is started below.
        self.log = Registry(mode="none", port=self.PORT, root=storage, workdir=workdir)
        config = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(storage)},
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}, "readonly": {"enabled": True}},
            },
            "http": {"addr": f"{link.ns_addr}:{self.PORT}", "secret": secrets.token_hex(16)},
        }
        config_path = workdir / "config.yml"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        binary = shutil.which("docker-registry") or "docker-registry"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with self.log.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                ["ip", "netns", "exec", link.namespace, binary, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        wait_ready(f"{self.url}/v2/", self._process, self.log.log_path)

    def stop(self) -> None:
        stop_group(self._process)


# Clients


@dataclass(frozen=True)
class Fetch:
    """One `curl -o /dev/null`."""

    status: int
    size: int
    seconds: float
    headers: dict[str, str]

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6


def _curl_command(url: str, accept: str | None, insecure: bool = False) -> list[str]:
    command = ["curl", "-sS", "-o", "/dev/null", "-D", "-", *(["-k"] if insecure else [])]
    if accept:
        command += ["-H", f"Accept: {accept}"]
    return [*command, "-w", "\n%{http_code} %{size_download} %{time_total}\n", url]


def _parse_curl(output: str) -> Fetch:
    lines = output.strip().splitlines()
    status, size, seconds = lines[-1].split()
    headers = {}
    for line in lines[:-1]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Fetch(int(status), int(size), float(seconds), headers)


def fetch(
    url: str, *, accept: str | None = None, size: int | None = None, insecure: bool = False
) -> Fetch:
    """GET `url` with curl into /dev/null; raise unless 200 (and `size` bytes, if given).
    `insecure`: curl -k (a self-signed certificate)."""
    command = _curl_command(url, accept, insecure)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"curl {url}: {result.stderr.strip()}")
    return _checked(url, _parse_curl(result.stdout), size)


def fetch_many(url: str, clients: int, size: int) -> tuple[float, list[Fetch]]:
    """`clients` curls of `url` at once: the wall time until the last one is done, and each."""
    processes: list[subprocess.Popen[str]] = []
    try:
        started = time.monotonic()
        for _ in range(clients):
            processes.append(
                subprocess.Popen(
                    _curl_command(url, None),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [process.communicate() for process in processes]
        wall = time.monotonic() - started
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    fetches = []
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise BenchError(f"curl {url}: {stderr.strip()}")
        fetches.append(_checked(url, _parse_curl(stdout), size))
    return wall, fetches


def _checked(url: str, result: Fetch, size: int | None) -> Fetch:
    if result.status != 200 or (size is not None and result.size != size):
        raise BenchError(f"GET {url}: {result.status}, {result.size} bytes (wanted {size})")
    return result


@dataclass(frozen=True)
class WrkResult:
    """What `wrk` reported."""

    requests_per_s: float
    non_2xx: int
    socket_errors: str | None


def wrk(url: str, accept: str, seconds: int, threads: int = 2, connections: int = 32) -> WrkResult:
    """`wrk -tT -cC -dDs -H 'Accept: ...' URL`."""
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "-H",
        f"Accept: {accept}",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    if result.returncode != 0 or rate is None:
        raise BenchError(f"wrk {url}: {result.stderr.strip() or result.stdout}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", result.stdout)
    errors = re.search(r"Socket errors:\s+(.*)", result.stdout)
    return WrkResult(
        requests_per_s=float(rate.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=errors.group(1).strip() if errors else None,
    )


PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/reported_kib")


def page_reporting_kib() -> int | None:
    """How much free memory this VM's kernel has handed back to its host so far (free page
    reporting), None on a machine without it."""
    try:
        return int(PAGE_REPORTING.read_text())
    except (OSError, ValueError):
        return None


def page_cache_write_cost(directory: Path, mib: int, idle: float = 6.0) -> tuple[float, float]:
    """CPU-seconds to write `mib` MiB into a new file: first after `idle` seconds (on a VM
    with free page reporting the kernel has handed the free pages back to the host by then,
    and each new page of cache faults in host memory), then again at once into the pages
    the first file freed. Both files are deleted."""
    block = os.urandom(1 << 20)
    costs = []
    for wait in (idle, 0.0):
        time.sleep(wait)
        path = directory / "page-cache-probe"
        started = time.thread_time()
        with path.open("wb", buffering=0) as file:
            for _ in range(mib):
                file.write(block)
        costs.append(time.thread_time() - started)
        path.unlink()
    return costs[0], costs[1]


def wait_stored(root: Path, digest: str, size: int, deadline: float) -> float:
    """Wait until the blob is committed under `root` (registry:2's layout; polled every
    20 ms); return the time then."""
    while True:
        with contextlib.suppress(OSError):
            if blob_data_path(root, digest).stat().st_size == size:
                return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"{digest} was not stored under {root}")
        time.sleep(0.02)


def wait_cached(mirror: Mirror, digest: str, size: int, deadline: float) -> float:
    """`wait_stored` in the mirror's cache, with the end of its log when it times out."""
    try:
        return wait_stored(mirror.root, digest, size, deadline)
    except BenchError as exc:
        raise BenchError(f"{mirror.kind}: {exc}:\n{mirror.log_tail()}") from None


def settle(
    mirror: Mirror, upstream: Registry, digest: str, size: int, timeout: float = STORE_TIMEOUT
) -> int:
    """Wait until `mirror` has committed the blob and the upstream's GET count for it stops
    moving (a log line trails its response); return that count."""
    deadline = time.monotonic() + timeout
    wait_cached(mirror, digest, size, deadline)
    suffix = f"/blobs/{digest}"
    count, since = upstream.count("GET", suffix), time.monotonic()
    while time.monotonic() - since < 0.5 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = upstream.count("GET", suffix)
        if now != count:
            count, since = now, time.monotonic()
    return count

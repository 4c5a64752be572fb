"""Many slow clients of one warm blob: the mirror's memory per client, against registry:2's.

`.venv/bin/python -m bench.slow_clients --clients 100 --mib 256 --rate 2`: a real registry:2
upstream on loopback holds one blob; the mirror (edgeproxy, one worker, or `--baseline`:
registry:2 in proxy mode) caches it (one whole GET), then N clients ask for it at once and read
it at `--rate` MB/s each (0: read the head and 64 KiB, then nothing). After `--settle` s the
mirror's RSS (master and worker summed) is sampled for `--seconds` s; printed: its median and
peak above the RSS before the clients came, and the median per client. Not run by the tests;
bench/README.md has its figures. Columns: mirror, clients, rate, idle RSS, median and peak
above it, per client, what the clients read together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import pid_with_args, process_tree, stop_group
from bench.many_cold import MiB, make_blobs, start_edgeproxy
from tests.support.registry import Registry, start_registry


def rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def slow_client(port: int, path: str, rate: float, stop: asyncio.Event) -> int:
    """Read the answer at `rate` MB/s (0: 64 KiB, then nothing) until `stop`; bytes read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a slow link's window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = 0
    piece = 16 * 1024
    began = time.monotonic()
    try:
        while not stop.is_set():
            if rate == 0 and got >= 64 * 1024:
                await stop.wait()
                break
            data = await loop.sock_recv(sock, piece)
            if not data:
                break
            got += len(data)
            if rate:
                ahead = got / (rate * 1e6) - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    finally:
        sock.close()
    return got


async def run_clients(
    port: int, path: str, args: argparse.Namespace, pid: int
) -> tuple[list[int], float]:
    """RSS samples of the mirror (`pid` and its children) while the clients read; the MB/s
    they read, together."""
    began = time.monotonic()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(slow_client(port, path, args.rate, stop)) for _ in range(args.clients)
    ]
    await asyncio.sleep(args.settle)
    samples = []
    for _ in range(int(args.seconds / 0.25)):
        samples.append(rss_kib(pid))
        await asyncio.sleep(0.25)
    stop.set()
    got = await asyncio.gather(*tasks)
    return samples, sum(got) / (time.monotonic() - began) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rate", type=float, default=2.0, help="MB/s per client; 0: stalled")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--baseline", action="store_true", help="registry:2 in proxy mode")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "slow_clients"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    upstream = start_registry(args.workdir / "upstream")
    work = Path(tempfile.mkdtemp(prefix="slow-", dir=args.workdir))
    baseline: Registry | None = None
    process: subprocess.Popen[bytes] | None = None
    try:
        [digest] = make_blobs(upstream.root, 1, args.mib * MiB)
        path = f"/v2/bench/many/blobs/{digest}"
        if args.baseline:
            baseline = start_registry(work / "baseline", remote=upstream.url)
            port = baseline.port
            found = pid_with_args("serve", str(baseline.config_path))
            assert found is not None, "registry:2 is not running"
            pid = found
        else:
            process, port = start_edgeproxy(work, upstream.url, None)
            pid = process.pid
        for _ in range(2):  # cold, then warm: registry:2 stores a blob after its first answer
            with httpx.stream("GET", f"http://127.0.0.1:{port}{path}", timeout=300) as answer:
                for _ in answer.iter_bytes():
                    pass
            time.sleep(3)
        idle = rss_kib(pid)
        samples, rate = asyncio.run(run_clients(port, path, args, pid))
        kind = "registry:2" if args.baseline else "edgeproxy"
        median = (statistics.median(samples) - idle) / 1024
        peak = (max(samples) - idle) / 1024
        print(
            f"| {kind} | {args.clients} | {args.rate} MB/s | {idle / 1024:.0f} MiB"
            f" | +{median:.0f} MiB | +{peak:.0f} MiB | {median / args.clients * 1024:.0f} KiB"
            f" | {rate:.0f} MB/s |",
            flush=True,
        )
    finally:
        if baseline is not None:
            baseline.close()
        if process is not None:
            stop_group(process)
        upstream.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(work)


if __name__ == "__main__":
    main()

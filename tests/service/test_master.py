"""edgeproxy as a service: sd_notify on a real datagram socket, SIGHUP reload (config and
certificate) under a download in flight, a refused reload, SIGTERM's drain."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import resource
import signal
import socket
import ssl
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy import server
from edgeproxy.config import config_from_dict
from edgeproxy.edge.accesslog import AccessLog
from edgeproxy.edge.certs import self_signed
from edgeproxy.mirror.storage import FilesystemStorage
from edgeproxy.service.master import Master
from tests.support.ports import free_port
from tests.support.servers import WITHOUT_DAC, EdgeproxyProcess, write_toml
from tests.support.wait import wait_until

OFFLINE_UPSTREAM = {"name": "docker.io", "url": "http://127.0.0.1:1"}
BIG_BLOB = 1 << 30  # the 1 GiB download


class NotifySocket:
    """The AF_UNIX datagram socket systemd gives a Type=notify service in NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(60)

    def next(self) -> dict[str, str]:
        """The next notification, as its KEY=VALUE fields."""
        message = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in message.splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def mirror_config(tmp_path: Path, port: int, **mirror: Any) -> dict[str, Any]:
    return {
        "mirror": {
            "root": str(tmp_path / "cache"),
            "listen": f"127.0.0.1:{port}",
            "upstream": [OFFLINE_UPSTREAM],
            **mirror,
        },
        "edge": {"http": f"127.0.0.1:{free_port()}", "workers": 2},
    }


@contextmanager
def started(config_path: Path, port: int, notify: NotifySocket) -> Iterator[EdgeproxyProcess]:
    process = EdgeproxyProcess(config_path, port, env={"NOTIFY_SOCKET": str(notify.path)})
    process.start()
    try:
        assert notify.next()["READY"] == "1"
        yield process
    finally:
        process.stop()


def test_notify_ready_reload_refused_reload_stopping(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    port = free_port()
    path = write_toml(tmp_path / "proxy.toml", mirror_config(tmp_path, port))
    with started(path, port, notify_socket) as process:
        assert httpx.get(f"{process.url}/v2/").headers.get("x-reloaded") is None

        config = mirror_config(tmp_path, port, headers={"X-Reloaded": "yes"})
        write_toml(path, config)
        os.kill(process.pid, signal.SIGHUP)
        reloading = notify_socket.next()
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert notify_socket.next()["READY"] == "1"
        for _ in range(10):  # READY=1 comes once no old worker accepts any more
            assert httpx.get(f"{process.url}/v2/").headers["x-reloaded"] == "yes"

        path.write_text('[mirror]\nroot = "x"\nlisten = "nope"\n')
        os.kill(process.pid, signal.SIGHUP)
        assert wait_until(lambda: "reload refused" in process.log())
        assert "mirror.listen: not an address" in process.log()
        assert httpx.get(f"{process.url}/v2/").headers["x-reloaded"] == "yes"

        os.kill(process.pid, signal.SIGTERM)
        assert notify_socket.next()["STOPPING"] == "1"
        assert process.wait() == 0
    assert "Traceback" not in process.log()


def write_warm_blob(root: Path, size: int, repository: str = "test/big") -> str:
    """A blob of `size` bytes straight into the cache (registry:2's layout), linked in
    `repository`; its digest."""
    block = os.urandom(1 << 20)
    hasher = hashlib.sha256()
    staging = root / "staging"
    staging.parent.mkdir(parents=True, exist_ok=True)
    with staging.open("wb") as out:
        for index in range(size >> 20):
            chunk = index.to_bytes(8, "big") + block[8:]
            hasher.update(chunk)
            out.write(chunk)
    hexdigest = hasher.hexdigest()
    data = root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
    data.parent.mkdir(parents=True)
    staging.rename(data)
    digest = f"sha256:{hexdigest}"
    FilesystemStorage(root).link_blob(repository, digest)
    return digest


def edge_config(tmp_path: Path, ports: tuple[int, int], certs: Path, **edge: Any) -> dict[str, Any]:
    return {
        "mirror": {"root": str(tmp_path / "cache"), "upstream": [OFFLINE_UPSTREAM]},
        "edge": {
            "https": f"127.0.0.1:{ports[0]}",
            "http": f"127.0.0.1:{ports[1]}",
            "access_log": "off",
            "workers": 2,
            "tls": {"certificate": str(certs / "server.crt"), "key": str(certs / "server.key")},
            **edge,
        },
    }


def served_certificate(port: int) -> bytes:
    """The DER certificate a new TLS connection to 127.0.0.1:port is given."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def pem_to_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@contextmanager
def download(url: str, ca: Path) -> Iterator[Iterator[bytes]]:
    """A GET whose body the test reads at its own pace (the server waits meanwhile)."""
    with (
        httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=120) as client,
        client.stream("GET", url) as response,
    ):
        assert response.status_code == 200
        yield response.iter_bytes(1 << 20)


def test_sighup_swaps_certificate_and_config_without_dropping_a_download(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    self_signed(["127.0.0.1"], old)
    self_signed(["127.0.0.1"], new)
    digest = write_warm_blob(tmp_path / "cache", BIG_BLOB)
    ports = https, http = free_port(), free_port()
    path = write_toml(tmp_path / "proxy.toml", edge_config(tmp_path, ports, old))
    with started(path, https, notify_socket) as process:
        url = f"https://127.0.0.1:{https}/v2/test/big/blobs/{digest}"
        with download(url, old / "server.crt") as body:
            hasher = hashlib.sha256(next(body))  # in flight: the rest waits in the server

            write_toml(path, edge_config(tmp_path, ports, new, server_name="reloaded"))
            os.kill(process.pid, signal.SIGHUP)
            assert notify_socket.next()["RELOADING"] == "1"
            assert notify_socket.next()["READY"] == "1"
            for _ in range(10):
                assert served_certificate(https) == pem_to_der(new / "server.crt")
            redirect = httpx.get(f"http://127.0.0.1:{http}/v2/", timeout=30)
            assert redirect.headers["location"].startswith("https://reloaded:")
            assert "old workers drained" not in process.log()  # ours is still sending

            for chunk in body:
                hasher.update(chunk)
        assert f"sha256:{hasher.hexdigest()}" == digest
        assert wait_until(lambda: "old workers drained" in process.log())


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGQUIT], ids=lambda s: s.name)
def test_sigterm_drains_a_download_then_exits_0(
    tmp_path: Path, notify_socket: NotifySocket, stop: signal.Signals
) -> None:
    """SIGTERM, or SIGQUIT (nginx's graceful stop: Debian's nginx unit stops with it; by
    default it would dump the master's core), to the master."""
    certs = tmp_path / "certs"
    self_signed(["127.0.0.1"], certs)
    digest = write_warm_blob(tmp_path / "cache", 256 << 20)
    ports = https, _ = free_port(), free_port()
    path = write_toml(tmp_path / "proxy.toml", edge_config(tmp_path, ports, certs))
    with started(path, https, notify_socket) as process:
        url = f"https://127.0.0.1:{https}/v2/test/big/blobs/{digest}"
        with download(url, certs / "server.crt") as body:
            hasher = hashlib.sha256(next(body))
            os.kill(process.pid, stop)
            assert notify_socket.next()["STOPPING"] == "1"
            # New connections are refused once every process closed its listener copy.
            assert wait_until(lambda: not accepts(https))
            for chunk in body:
                hasher.update(chunk)
        assert f"sha256:{hasher.hexdigest()}" == digest
        assert process.wait() == 0


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def test_reload_moves_a_listener_and_refuses_a_certificate_that_does_not_load(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    certs = tmp_path / "certs"
    self_signed(["127.0.0.1"], certs)
    ports = https, http = free_port(), free_port()
    path = write_toml(tmp_path / "proxy.toml", edge_config(tmp_path, ports, certs))
    with started(path, https, notify_socket) as process:
        moved = free_port()
        write_toml(path, edge_config(tmp_path, (https, moved), certs))
        os.kill(process.pid, signal.SIGHUP)
        assert notify_socket.next()["RELOADING"] == "1"
        assert notify_socket.next()["READY"] == "1"
        assert httpx.get(f"http://127.0.0.1:{moved}/v2/").status_code == 301
        assert wait_until(lambda: not accepts(http))  # closed once the old workers are gone

        missing = tmp_path / "missing"
        write_toml(path, edge_config(tmp_path, (https, free_port()), missing))
        os.kill(process.pid, signal.SIGHUP)
        assert wait_until(lambda: "reload refused" in process.log())
        assert "edge.tls:" in process.log()
        assert served_certificate(https) == pem_to_der(certs / "server.crt")
        assert httpx.get(f"http://127.0.0.1:{moved}/v2/").status_code == 301


def test_a_reload_refused_for_any_reason_keeps_the_master(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """Refusals that escaped as tracebacks and took the master (and so the service) down: a
    key the service may not read (PermissionError) and a size too large for a float
    (OverflowError). nginx logs [emerg] and keeps its workers; so does edgeproxy. Run as root
    without the power to read anyone's files, as the service's user would be."""
    certs = tmp_path / "certs"
    self_signed(["127.0.0.1"], certs)
    ports = https, http = free_port(), free_port()
    path = write_toml(tmp_path / "proxy.toml", edge_config(tmp_path, ports, certs))
    env = {"NOTIFY_SOCKET": str(notify_socket.path)}
    process = EdgeproxyProcess(path, https, env=env, prefix=WITHOUT_DAC)
    process.start()
    try:
        assert notify_socket.next()["READY"] == "1"
        locked = tmp_path / "locked"
        self_signed(["127.0.0.1"], locked)
        os.chown(locked / "server.key", 65534, 65534)
        (locked / "server.key").chmod(0o600)
        write_toml(path, edge_config(tmp_path, ports, locked))
        os.kill(process.pid, signal.SIGHUP)
        assert wait_until(lambda: "cannot read: Permission denied" in process.log())
        config = edge_config(tmp_path, ports, certs)
        config["mirror"]["cache"] = {"max_size": "9" * 400 + "m"}
        write_toml(path, config)
        os.kill(process.pid, signal.SIGHUP)
        assert wait_until(lambda: "mirror.cache.max_size: not a size" in process.log())
        assert process.log().count("reload refused") == 2
        assert served_certificate(https) == pem_to_der(certs / "server.crt")
        assert httpx.get(f"http://127.0.0.1:{http}/v2/").status_code == 301
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait() == 0
    finally:
        process.stop()
    assert "Traceback" not in process.log()


def test_sigterm_cuts_a_stalled_download_after_shutdown_timeout(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    certs = tmp_path / "certs"
    self_signed(["127.0.0.1"], certs)
    digest = write_warm_blob(tmp_path / "cache", 64 << 20)
    ports = https, _ = free_port(), free_port()
    config = edge_config(tmp_path, ports, certs, shutdown_timeout="1s")
    path = write_toml(tmp_path / "proxy.toml", config)
    with started(path, https, notify_socket) as process:
        url = f"https://127.0.0.1:{https}/v2/test/big/blobs/{digest}"
        with download(url, certs / "server.crt") as body:
            next(body)  # then this client reads nothing more
            os.kill(process.pid, signal.SIGTERM)
            assert process.wait() == 0  # the drain gave up on it after 1 s
        assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in process.log()
        assert "Traceback" not in process.log()  # the line above says it all


def test_a_reload_whose_workers_fail_to_start_keeps_the_old_ones(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    port = free_port()
    config = mirror_config(tmp_path, port)
    path = write_toml(tmp_path / "proxy.toml", config)
    with started(path, port, notify_socket) as process:
        # A cache root whose layout a worker cannot make (`docker` is a file): the master's
        # checks pass, each new worker fails at start.
        broken = tmp_path / "broken-root"
        broken.mkdir()
        (broken / "docker").write_text("not a folder")
        config["mirror"]["root"] = str(broken)
        config["mirror"]["headers"] = {"X-Reloaded": "yes"}
        write_toml(path, config)
        os.kill(process.pid, signal.SIGHUP)
        assert notify_socket.next()["RELOADING"] == "1"
        assert notify_socket.next()["READY"] == "1"
        assert "reload failed: worker" in process.log()
        for _ in range(10):
            response = httpx.get(f"{process.url}/v2/")
            assert response.status_code == 200
            assert "x-reloaded" not in response.headers


def test_sigusr1_reopens_the_access_log_as_nginx_does(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """logrotate moves the file, then signals USR1 (nginx's logrotate does; by default the
    signal kills). The workers go on, writing to a new file; nothing restarts."""
    port = free_port()
    config = mirror_config(tmp_path, port)
    log = tmp_path / "access.log"
    config["edge"]["access_log"] = str(log)
    edge = f"http://{config['edge']['http']}"
    with started(write_toml(tmp_path / "proxy.toml", config), port, notify_socket) as process:
        workers = re.findall(r"worker (\d+) started", process.log())
        assert httpx.get(f"{edge}/v2/?before").status_code == 200
        assert wait_until(lambda: "/v2/?before" in log.read_text())
        rotated = log.rename(tmp_path / "access.log.1")
        os.kill(process.pid, signal.SIGUSR1)
        reopened = [f"{pid}#0: edgeproxy.accesslog: reopened" for pid in workers]
        assert wait_until(lambda: all(line in process.log() for line in reopened))
        for _ in range(10):  # new connections: spread over the workers
            assert httpx.get(f"{edge}/v2/?after", headers={"Connection": "close"}).is_success
        assert wait_until(lambda: log.read_text().count("/v2/?after") == 10)
        assert "?after" not in rotated.read_text()
        assert "reopening the access log" in process.log()  # the master passed it on
        assert re.findall(r"worker (\d+) started", process.log()) == workers  # none restarted


def test_sigusr2_to_the_group_changes_nothing(tmp_path: Path, notify_socket: NotifySocket) -> None:
    """nginx's binary upgrade signal, sent to every process (systemctl kill's default; by
    default the signal kills): the master says it is not supported, and all keep serving."""
    port = free_port()
    config_path = write_toml(tmp_path / "proxy.toml", mirror_config(tmp_path, port))
    with started(config_path, port, notify_socket) as process:
        workers = re.findall(r"worker (\d+) started", process.log())
        for pid in (process.pid, *map(int, workers)):
            os.kill(pid, signal.SIGUSR2)
        assert wait_until(lambda: "SIGUSR2 ignored" in process.log())
        for _ in range(10):
            assert httpx.get(f"{process.url}/v2/", headers={"Connection": "close"}).is_success
        assert re.findall(r"worker (\d+) started", process.log()) == workers  # none restarted


def test_a_refused_fork_is_an_error_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EAGAIN from fork() (a pid or memory limit): at start the master exits 1 with a line
    saying so; nginx's master logs "fork() failed" the same way and goes on serving."""
    config = config_from_dict(mirror_config(tmp_path, free_port()))

    def refused() -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refused)
    master = Master(tmp_path / "proxy.toml", config, lambda *_: None)
    with caplog.at_level(logging.ERROR, logger="edgeproxy"):
        assert master.run() == 1
    assert "cannot start a worker: fork failed: Resource temporarily unavailable" in caplog.text


def test_a_reload_asked_for_during_a_reload_follows_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`systemctl reload` twice in a row (a config change, then a renewed certificate): the
    second SIGHUP came while the first reload's workers were starting and was ignored, so the
    change made between the two never applied. Now a second reload follows the first."""
    path = tmp_path / "proxy.toml"

    def write(generation: str) -> None:
        config = mirror_config(tmp_path, port, headers={"X-Generation": generation})
        config["edge"]["workers"] = 1
        write_toml(path, config)

    def work(config: Any, listeners: Any, report: int) -> None:
        """A worker, ready once its generation's gate is open; SIGTERM ends it."""
        gate = tmp_path / f"gate-{config.mirror.headers['X-Generation']}"
        while not gate.exists():
            time.sleep(0.01)
        os.write(report, f"ready {os.getpid()}\n".encode())
        while True:
            signal.pause()

    port = free_port()
    write("first")
    for opened in ("first", "third"):
        (tmp_path / f"gate-{opened}").touch()
    master = Master(path, config_from_dict(tomllib.loads(path.read_text())), work)

    def operator() -> None:
        try:
            assert wait_until(lambda: master.announced)
            write("second")
            os.kill(os.getpid(), signal.SIGHUP)
            assert wait_until(lambda: master.next is not None)  # its workers wait for the gate
            write("third")
            os.kill(os.getpid(), signal.SIGHUP)
            assert wait_until(lambda: "reload: one is already under way" in caplog.text)
            (tmp_path / "gate-second").touch()
            assert wait_until(lambda: master.announced and master.next is None)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator)
    with caplog.at_level(logging.INFO, logger="edgeproxy"):
        thread.start()
        assert master.run() == 0
        thread.join()
    assert master.current.config.mirror.headers == {"X-Generation": "third"}


def test_a_signal_just_after_a_fork_is_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGTERM reaching a worker between its fork and its own handlers (under load, the
    group's and the master's both did) ran the master's handler in the worker: the worker
    served on, stopped by nothing but SIGKILL, and the master read the signal as its own
    (its wakeup fd is shared). Held until the worker set its handlers, it ends that worker."""
    settings = mirror_config(tmp_path, free_port())
    settings["edge"]["workers"] = 1
    config = config_from_dict(settings)
    real_fork = os.fork
    forks: list[int] = []

    def fork() -> int:
        forks.append(1)
        pid = real_fork()
        if pid == 0 and len(forks) == 1:  # the first worker, before `_child` runs
            os.kill(os.getpid(), signal.SIGTERM)
        return pid

    def work(config: Any, listeners: Any, report: int) -> None:
        (tmp_path / f"served-{os.getpid()}").touch()
        os.write(report, f"ready {os.getpid()}\n".encode())
        while True:
            signal.pause()

    monkeypatch.setattr(os, "fork", fork)
    master = Master(tmp_path / "proxy.toml", config, work)
    seen: dict[str, bool] = {}

    def operator() -> None:
        try:
            assert wait_until(lambda: master.announced or master.stopping)
            seen.update(announced=master.announced, stopping=master.stopping)
        finally:
            if not master.stopping:  # once it stops, it restores SIGTERM's default: pytest's
                os.kill(os.getpid(), signal.SIGTERM)
            if not wait_until(lambda: not master.started, timeout=10):
                for pid in list(master.started):  # one that lost its SIGTERM: do not hang
                    os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=operator)
    with caplog.at_level(logging.INFO, logger="edgeproxy"):
        thread.start()
        assert master.run() == 0
        thread.join()
    assert seen == {"announced": True, "stopping": False}
    first, replacement = map(int, re.findall(r"worker (\d+) started", caplog.text))
    assert f"worker {first} exited with -15; starting another" in caplog.text
    assert [p.name for p in tmp_path.glob("served-*")] == [f"served-{replacement}"]


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """Every client, upstream connection, spool and reader of a cold blob is a descriptor: a
    shell's soft limit (1024) was ~150 cold blobs a worker, and past it libuv accepted and
    closed each new connection at once, logging nothing. registry:2 (Go's runtime) raises
    the soft limit to the hard one at start; so does edgeproxy now."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1000:
        pytest.skip("the hard limit on open files is too low to show it")
    port = free_port()
    settings = mirror_config(tmp_path, port)
    settings["edge"]["workers"] = 1
    path = write_toml(tmp_path / "proxy.toml", settings)
    process = EdgeproxyProcess(
        path,
        port,
        env={"NOTIFY_SOCKET": str(notify_socket.path)},
        prefix=["prlimit", "--nofile=64:", "--"],  # the soft limit only; the hard one stays
    )
    process.start()
    clients: list[socket.socket] = []
    try:
        assert notify_socket.next()["READY"] == "1"
        for _ in range(100):  # all open at once: more than 64 descriptors in the worker
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        for client in clients:
            client.sendall(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n")
        for client in clients:
            assert client.makefile("rb").readline().startswith(b"HTTP/1.1 200 ")
    finally:
        for client in clients:
            client.close()
        process.stop()


def test_a_usr1_while_a_worker_starts_reopens_its_log_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """logrotate during a reload: the log moved, and USR1 came after a new worker opened it
    but before the worker had its handler. The worker ignored the signal and wrote on to the
    moved file (lost once logrotate compressed it). Held until then, it reopens the log."""
    settings = mirror_config(tmp_path, free_port())
    settings["edge"]["workers"] = 1
    log = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    settings["edge"]["access_log"] = str(log)
    edge = f"http://{settings['edge']['http']}"

    class RotatedAtOnce(AccessLog):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            log.rename(rotated)  # logrotate, before this worker can act on its signal
            os.kill(os.getpid(), signal.SIGUSR1)

    def work(config: Any, listeners: Any, report: int) -> None:
        monkeypatch.setattr(server, "AccessLog", RotatedAtOnce)  # in the worker only: forked
        server.run_worker(config, listeners, report)

    master = Master(tmp_path / "proxy.toml", config_from_dict(settings), work)
    answers: list[int] = []

    def operator() -> None:
        try:
            assert wait_until(lambda: master.announced)
            answers.append(httpx.get(f"{edge}/v2/?after", timeout=30).status_code)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator)
    thread.start()
    assert master.run() == 0
    thread.join()
    assert answers == [200]
    assert "/v2/?after" in log.read_text()  # written once the worker is gone: flushed
    assert "?after" not in rotated.read_text()

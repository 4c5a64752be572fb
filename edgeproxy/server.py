"""The process model: bind the listeners, serve the apps, stop cleanly on a signal.

The first process binds every listener, then forks `workers` processes (nginx's master and
workers). Each worker runs one event loop with one uvicorn `Server` per listener: the
mirror's own listener (if set) and the edge's http and https listeners (if `[edge]` is set),
sharing one `MirrorApp`. Workers share the cache safely: fills are locked across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from edgeproxy.config import Config, EdgeConfig
from edgeproxy.edge.accesslog import AccessLog
from edgeproxy.edge.app import EdgeApp
from edgeproxy.edge.protocol import ConnectionSettings, EdgeHttpProtocol
from edgeproxy.edge.proxy import ProxyBackend
from edgeproxy.edge.sniff import TlsSniffer
from edgeproxy.edge.tls import TlsError, server_context
from edgeproxy.mirror.app import MirrorApp

log = logging.getLogger("edgeproxy")


def configure_logging(level: str = "info") -> None:
    """One line per event, like nginx's error_log: `2026/11/27 20:44:50 [warn] message`."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
        datefmt="%Y/%m/%d %H:%M:%S",
    )
    for name in ("httpx", "httpcore", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"edgeproxy: cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve`: several of them share one loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _uvicorn(app: Any, **options: Any) -> _Server:
    return _Server(
        uvicorn.Config(
            app,
            loop="none",
            http=options.pop("http", "httptools"),
            lifespan="off",  # the apps are closed by `serve`, once, after every server stopped
            log_config=None,
            server_header=False,
            **options,
        )
    )


@dataclass
class Listeners:
    """The sockets, bound once by the first process and shared by every worker."""

    mirror: socket.socket | None = None
    http: socket.socket | None = None
    https: socket.socket | None = None


def bind_listeners(config: Config) -> Listeners:
    edge = config.edge
    if config.mirror.listen is None and edge is None:
        raise SystemExit("edgeproxy: nothing to listen on: set mirror.listen or [edge]")
    if edge is not None and edge.tls is not None:
        try:
            server_context(edge.tls)  # fail here, naming the file, not in the middle of start-up
        except TlsError as exc:
            raise SystemExit(f"edgeproxy: edge.tls: {exc}") from exc
    listeners = Listeners()
    if config.mirror.listen is not None:
        listeners.mirror = bind(*config.mirror.listen)
    if edge is not None and edge.http is not None:
        listeners.http = bind(*edge.http)
    if edge is not None and edge.https is not None and edge.tls is not None:
        listeners.https = bind(*edge.https)
    return listeners


async def serve(config: Config, listeners: Listeners) -> None:
    """Serve every listener in this process until SIGINT/SIGTERM."""
    edge = config.edge
    servers: list[tuple[_Server, socket.socket]] = []
    mirror: MirrorApp | None = None
    if listeners.mirror is not None or (edge is not None and edge.embedded):
        mirror = MirrorApp(config.mirror)
    if listeners.mirror is not None:
        assert mirror is not None
        server = _uvicorn(mirror, access_log=True, timeout_keep_alive=120)
        servers.append((server, listeners.mirror))
        host, port = listeners.mirror.getsockname()[:2]
        log.info("mirror listening on %s:%d (cache %s)", host, port, config.mirror.root)
    proxy: ProxyBackend | None = None
    access_log: AccessLog | None = None
    if edge is not None:
        if edge.embedded:
            assert mirror is not None
            backend: Any = mirror
        else:
            proxy = ProxyBackend(edge.backend_url, edge.connect_timeout, edge.read_timeout)
            backend = proxy
        access_log = AccessLog(edge.access_log, edge.access_log_format)
        app = EdgeApp(edge, backend, access_log)
        servers.extend(_edge_servers(edge, app, access_log, listeners))
    try:
        await _run(servers)
    finally:
        if mirror is not None:
            await mirror.aclose()
        if proxy is not None:
            await proxy.aclose()
        if access_log is not None:
            access_log.close()


def _edge_servers(
    edge: EdgeConfig, app: EdgeApp, access_log: AccessLog, listeners: Listeners
) -> list[tuple[_Server, socket.socket]]:
    settings = ConnectionSettings(
        access_log, edge.server_name, edge.client_header_timeout, edge.client_body_timeout
    )
    options: dict[str, Any] = {
        "access_log": False,  # the edge writes its own, in nginx's format
        # $remote_addr and $scheme are the connection's: never taken from a client's headers.
        "proxy_headers": False,
        "timeout_keep_alive": max(1, round(edge.keepalive_timeout)),
    }
    servers = []
    target = "the mirror, embedded" if edge.embedded else edge.backend_url
    if listeners.http is not None:
        host, port = listeners.http.getsockname()[:2]
        http = functools.partial(EdgeHttpProtocol, settings=settings)
        servers.append((_uvicorn(app, http=http, **options), listeners.http))
        mode = "redirects to https" if edge.tls is not None else f"serves {target}"
        log.info("edge listening on http://%s:%d (%s)", host, port, mode)
    if listeners.https is not None and edge.tls is not None:
        host, port = listeners.https.getsockname()[:2]
        # TLS is started by the protocol (sniff.py): plain HTTP there gets nginx's 400 page.
        context = server_context(edge.tls)
        sniffer = functools.partial(TlsSniffer, settings=settings, context=context)
        servers.append((_uvicorn(app, http=sniffer, **options), listeners.https))
        log.info("edge listening on https://%s:%d (serves %s)", host, port, target)
    return servers


async def _run(servers: list[tuple[_Server, socket.socket]]) -> None:
    """Run every server until a signal (or one of them stopping) stops them all."""

    def stop() -> None:
        for server, _ in servers:
            if server.should_exit:
                server.force_exit = True  # a second signal: do not wait for open connections
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop()
        await asyncio.wait(tasks)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    for task in tasks:
        error = task.exception()
        if error is not None:
            raise error


def run(config: Config) -> None:
    """Bind every listener, then serve them in `workers` processes (or this one)."""
    try:
        config.mirror.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(
            f"edgeproxy: mirror.root: cannot create {config.mirror.root}: {exc.strerror}"
        ) from exc
    listeners = bind_listeners(config)
    workers = config.worker_count
    if workers == 1:
        _run_loop(serve(config, listeners))
    else:
        _supervise(workers, lambda: _run_loop(serve(config, listeners)))


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(main)
    else:
        uvloop.run(main)


def _supervise(count: int, work: Callable[[], None]) -> None:
    """nginx's master: fork `count` workers sharing the listeners, replace one that dies,
    pass SIGTERM/SIGINT on to all of them and wait for them to drain."""
    children: dict[int, float] = {}  # pid -> start time
    stopping = False

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                work()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = time.monotonic()
        log.info("worker %d started", pid)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(count):
        spawn()
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, time.monotonic())
        if stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        if time.monotonic() - started < 2 and code > 0:  # failing at start: do not spin
            log.error("worker %d exited with %d at start; stopping", pid, code)
            failed = True
            stop(signal.SIGTERM, None)
            continue
        log.warning("worker %d exited with %d; starting another", pid, code)
        spawn()
    if failed:
        raise SystemExit(1)

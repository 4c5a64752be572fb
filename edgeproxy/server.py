"""A worker: bind the listeners, serve the apps, drain on a signal.

The master (`edgeproxy.service.master`) binds every listener, then forks `workers`
processes (nginx's master and workers). Each worker runs one event loop with one uvicorn
`Server` per listener: the mirror's own listener (if set), the edge's http and https
listeners (if `[edge]` is set) and the metrics listener (if `[metrics]` is set), sharing one
`MirrorApp`. Workers share the cache safely: fills are locked across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvicorn

from edgeproxy import metrics
from edgeproxy.config import Config, ConfigError, EdgeConfig
from edgeproxy.edge.accesslog import AccessLog
from edgeproxy.edge.app import EdgeApp
from edgeproxy.edge.protocol import ConnectionSettings, EdgeHttpProtocol
from edgeproxy.edge.sniff import TlsSniffer
from edgeproxy.edge.tls import TlsError, server_context
from edgeproxy.health import PATH as HEALTH_PATH
from edgeproxy.health import HealthMonitor
from edgeproxy.logs import RequestLog, set_secrets
from edgeproxy.mirror.app import MirrorApp
from edgeproxy.mirror.auth import exposed_credentials
from edgeproxy.mirror.protocol import RegistryHttpProtocol
from edgeproxy.preflight import check
from edgeproxy.service.memory import QUIET_CHECK, QuietRelease

if TYPE_CHECKING:
    from edgeproxy.edge.proxy import ProxyBackend

log = logging.getLogger("edgeproxy")


def bind(host: str, port: int, key: str) -> socket.socket:
    """A listening socket on host:port, inherited by the workers; exit naming it and the key
    that asks for it if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"edgeproxy: {key}: cannot listen on {host}:{port}: {exc.strerror}"
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve`: several of them share one loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _uvicorn(app: Any, http: Any, **options: Any) -> _Server:
    """A server of `app` speaking `http` (a protocol class, or a factory of one)."""
    return _Server(
        uvicorn.Config(
            app,
            loop="none",
            http=http,
            lifespan="off",  # the apps are closed by `serve`, once, after every server stopped
            ws="none",  # an Upgrade is a plain request here, as nginx proxies it by default
            access_log=False,  # the edge logs in nginx's format, the mirror a RequestLog line
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
    metrics: socket.socket | None = None
    # The https listener's TLS context, made once too: the workers share its session ticket
    # keys, so a client resumes its session with any of them (nginx's master makes its own).
    tls: ssl.SSLContext | None = None

    def bound(self) -> list[socket.socket]:
        return [s for s in (self.mirror, self.http, self.https, self.metrics) if s is not None]


Bound = dict[tuple[str, int], socket.socket]


def bind_listeners(config: Config, bound: Bound | None = None) -> Listeners:
    """Bind what `config` listens on; an address already in `bound` keeps its socket (a
    reload must not close a listener for a moment, nor fail to bind an address it holds)."""
    bound = {} if bound is None else bound

    def get(address: tuple[str, int], key: str) -> socket.socket:
        if address not in bound:
            bound[address] = bind(*address, key)
        return bound[address]

    edge = config.edge
    try:
        check(config)  # fail here, naming the key and the file, not in the middle of start-up
    except ConfigError as exc:
        raise SystemExit(f"edgeproxy: {exc}") from exc
    for warning in exposed_credentials(config.mirror):
        log.warning("%s", warning)
    listeners = Listeners()
    if config.mirror.listen is not None:
        listeners.mirror = get(config.mirror.listen, "mirror.listen")
    if edge is not None and edge.http is not None:
        listeners.http = get(edge.http, "edge.http")
    if edge is not None and edge.https is not None and edge.tls is not None:
        listeners.https = get(edge.https, "edge.https")
        try:
            listeners.tls = server_context(edge.tls)
        except TlsError as exc:  # checked above: changed since
            raise SystemExit(f"edgeproxy: edge.tls: {exc}") from exc
    if config.metrics is not None:
        listeners.metrics = get(config.metrics.listen, "metrics.listen")
    return listeners


async def serve(config: Config, listeners: Listeners, report: int | None = None) -> None:
    """Serve every listener in this process until SIGINT/SIGTERM (then drain).

    `report` is the master's pipe: "ready PID" once every listener accepts, "closed PID"
    once this process stopped accepting (a reload waits for both)."""
    edge = config.edge
    set_secrets(u.password for u in config.mirror.upstream)
    if config.metrics is not None:
        metrics.enable()
    health = HealthMonitor(config.mirror.root, config.mirror.upstream, config.health)
    servers: list[tuple[_Server, socket.socket]] = []
    mirror: MirrorApp | None = None
    measured: Any = None  # the mirror, its requests counted by route
    if listeners.mirror is not None or (edge is not None and edge.embedded):
        mirror = MirrorApp(config.mirror, workers=config.worker_count)
        measured = metrics.RequestMetrics(mirror)
        mirror.start()
    if listeners.mirror is not None:
        routed = RequestLog(_with_health(measured, health))
        server = _uvicorn(routed, http=RegistryHttpProtocol, timeout_keep_alive=120)
        servers.append((server, listeners.mirror))
        host, port = listeners.mirror.getsockname()[:2]
        log.info("mirror listening on %s:%d (cache %s)", host, port, config.mirror.root)
    proxy: ProxyBackend | None = None
    access_log: AccessLog | None = None
    if edge is not None:
        if edge.embedded:
            # Not /debug/health: its upstream errors are not for the public edge (nginx in
            # front of registry:2 passes that path to the registry's API port, which 404s it).
            backend: Any = measured
        else:
            # Here, not at the top: aiohttp costs every worker ~10 MB that embedded never uses.
            from edgeproxy.edge.proxy import ProxyBackend

            proxy = ProxyBackend(edge.backend_url, edge.connect_timeout, edge.read_timeout)
            backend = metrics.RequestMetrics(proxy)  # the registry behind it, by route
        access_log = AccessLog(edge.access_log, edge.access_log_format)
        app = EdgeApp(edge, backend, access_log)
        servers.extend(_edge_servers(edge, app, access_log, listeners))
    if listeners.metrics is not None:
        cache = mirror.storage if mirror is not None else None  # points-to: no cache
        debug = _with_health(metrics.metrics_app(cache), health)
        servers.append((_uvicorn(debug, http=RegistryHttpProtocol), listeners.metrics))
        host, port = listeners.metrics.getsockname()[:2]
        log.info("metrics and health on http://%s:%d/metrics, %s", host, port, HEALTH_PATH)
    for server, _ in servers:
        server.config.timeout_graceful_shutdown = max(1, round(config.shutdown_timeout))
    checking = asyncio.create_task(health.run())
    loop = asyncio.get_running_loop()
    if access_log is not None:
        loop.add_signal_handler(signal.SIGUSR1, access_log.reopen)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])  # held since the fork
    try:
        await _run(servers, report)
    finally:
        if access_log is not None:
            _stop_handling(loop, [signal.SIGUSR1], report)
        checking.cancel()
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
        access_log,
        edge.server_name,
        edge.client_header_timeout,
        edge.client_body_timeout,
        edge.send_timeout,
    )
    options: dict[str, Any] = {
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
    if listeners.https is not None and listeners.tls is not None:
        host, port = listeners.https.getsockname()[:2]
        # TLS is started by the protocol (sniff.py): plain HTTP there gets nginx's 400 page.
        sniffer = functools.partial(TlsSniffer, settings=settings, context=listeners.tls)
        servers.append((_uvicorn(app, http=sniffer, **options), listeners.https))
        log.info("edge listening on https://%s:%d (serves %s)", host, port, target)
    return servers


async def _run(servers: list[tuple[_Server, socket.socket]], report: int | None) -> None:
    """Run every server until a signal (or one of them stopping) stops them all.

    SIGTERM/SIGINT drain: stop accepting at once, let open requests finish (bounded by
    `shutdown_timeout`); repeating them changes nothing (systemd and a terminal signal the
    whole group, the master passes them on too). SIGQUIT, from the master: force."""

    def drain() -> None:
        if all(server.should_exit for server, _ in servers):
            return
        for server, _ in servers:
            server.should_exit = True
            for listening in server.servers:  # now, not at uvicorn's next 0.1 s tick
                listening.close()
        _report(report, "closed")

    def force() -> None:
        for server, _ in servers:
            server.should_exit = server.force_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, drain)
    loop.add_signal_handler(signal.SIGQUIT, force)
    master = os.getppid()
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
    try:
        while not all(server.started for server, _ in servers):
            if any(task.done() for task in tasks):
                break
            await asyncio.sleep(0.01)
        else:
            _report(report, "ready")
        quiet = QuietRelease(server.server_state for server, _ in servers)
        next_look = loop.time() + QUIET_CHECK
        while not any(task.done() for task in tasks):
            await asyncio.wait(tasks, timeout=1, return_when=asyncio.FIRST_COMPLETED)
            if report is not None and os.getppid() != master:
                log.warning("the master process is gone; draining")
                drain()
            if loop.time() >= next_look:
                quiet.check()
                next_look = loop.time() + QUIET_CHECK
        drain()
        await asyncio.wait(tasks)
    finally:
        _stop_handling(loop, [signal.SIGINT, signal.SIGTERM, signal.SIGQUIT], report)
    for task in tasks:
        error = task.exception()
        if error is not None:
            raise error


def _stop_handling(
    loop: asyncio.AbstractEventLoop, signals: list[signal.Signals], report: int | None
) -> None:
    """Remove the loop's handlers. A worker (it reports to a master) then ignores the
    signals: it is on its way out, and their defaults (KeyboardInterrupt, a core dump, death
    by USR1 from logrotate) would cut its clean-up short."""
    for sig in signals:
        loop.remove_signal_handler(sig)
        if report is not None:
            signal.signal(sig, signal.SIG_IGN)


def _report(fd: int | None, event: str) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, f"{event} {os.getpid()}\n".encode())


def _with_health(app: Any, health: HealthMonitor) -> Any:
    """`app`, with `GET /debug/health` answered by `health` (as registry:2's debug server)."""

    async def routed(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == HEALTH_PATH:
            await health(scope, receive, send)
        else:
            await app(scope, receive, send)

    return routed


def run_worker(config: Config, listeners: Listeners, report: int | None = None) -> None:
    """One worker process's life: its event loop (uvloop) serving until drained."""
    _run_loop(serve(config, listeners, report))


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(main)
    else:
        uvloop.run(main)

"""What a valid config may still lack to run, checked before anything starts, as `nginx -t`
checks its listeners, certificates and logs. `edgeproxy check` (the unit's ExecStartPre and
ExecReload), `edgeproxy run` and every reload use it, so each fails the same way, naming the key
and the file."""

from __future__ import annotations

import errno
import os
import ssl

from edgeproxy.config import Config, ConfigError
from edgeproxy.edge.tls import TlsError, server_context
from edgeproxy.mirror.proxies import Proxies, ProxyError
from edgeproxy.mirror.upstream import ssl_context


def check(config: Config) -> None:
    """Raise ConfigError unless `config` can run: see `check_listeners` and `check_files`."""
    check_listeners(config)
    check_files(config)
    check_proxies()


def check_listeners(config: Config) -> None:
    """Raise ConfigError unless there is something to listen on, and no two listeners want
    the same port of the same address (a wildcard address takes the port on every one; port 0
    is any free one)."""
    edge, metrics = config.edge, config.metrics
    listeners = {
        "mirror.listen": config.mirror.listen,
        "edge.http": edge.http if edge else None,
        "edge.https": edge.https if edge else None,
        "metrics.listen": metrics.listen if metrics else None,
    }
    wanted = [(key, address) for key, address in listeners.items() if address is not None]
    if not any(key != "metrics.listen" for key, _ in wanted):
        raise ConfigError("nothing to listen on: set mirror.listen or [edge]")
    for i, (key, (host, port)) in enumerate(wanted):
        for other, (other_host, other_port) in wanted[:i]:
            if port == other_port != 0 and _overlap(host, other_host):
                raise ConfigError(f"{other} and {key} both want port {port} of {host}")


def _overlap(host: str, other: str) -> bool:
    """Whether two listeners on one port collide: the same address, `::` (every address, as
    Linux binds it), or `0.0.0.0` with another IPv4 address (not with an IPv6 one)."""
    if host == other or "::" in (host, other):
        return True
    return "0.0.0.0" in (host, other) and ":" not in host + other


def check_files(config: Config) -> None:
    """Raise ConfigError unless the edge's certificate and key load, its access log opens, the
    htpasswd file can be read (else every client would get 401) and each upstream's CA bundle
    loads."""
    edge = config.edge
    if edge is not None and edge.tls is not None:
        try:
            server_context(edge.tls)
        except TlsError as exc:
            raise ConfigError(f"edge.tls: {exc}") from exc
    if edge is not None:
        try:
            _check_appendable(edge.access_log)
        except OSError as exc:
            raise ConfigError(
                f"edge.access_log: cannot open {edge.access_log}: {exc.strerror}"
            ) from exc
    auth = config.mirror.auth
    if auth is not None and not os.access(auth.htpasswd, os.R_OK):
        raise ConfigError(f"mirror.auth.htpasswd: cannot read {auth.htpasswd}")
    for index, upstream in enumerate(config.mirror.upstream):
        if upstream.ca is None:
            continue
        try:
            ssl_context(str(upstream.ca))  # as the upstream client will
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(
                f"mirror.upstream.{index}.ca: cannot load {upstream.ca}: {reason}"
            ) from exc


def check_proxies() -> None:
    """Raise ConfigError unless every proxy variable of the environment can be used: the
    blob threads take http:// and https:// proxies only (NO_PROXY, read as Go reads it, has no
    error)."""
    try:
        Proxies.from_environment()
    except ProxyError as exc:  # names the variable
        raise ConfigError(f"the environment's {exc}") from None


def _check_appendable(target: str) -> None:
    """Raise OSError unless the access log `target` ("-", "off" or a file) can be appended
    to. A missing file is not made (nginx -t makes it, as the root its master runs as): made
    by `sudo edgeproxy check`, it would be root's, and the service's user could not open it."""
    if target in ("-", "off"):
        return
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_APPEND))
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(folder):
            raise
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target) from None

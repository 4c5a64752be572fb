"""The files a config names, checked before anything starts: what `nginx -t` does for its
certificates and logs. `edgeproxy check` (the unit's ExecStartPre and ExecReload), `edgeproxy run`
and every reload use it, so each fails the same way, naming the key and the file."""

from __future__ import annotations

import os
import ssl

from edgeproxy.config import Config, ConfigError
from edgeproxy.edge.accesslog import AccessLog
from edgeproxy.edge.tls import TlsError, server_context
from edgeproxy.mirror.upstream import ssl_context


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
            AccessLog(edge.access_log).close()  # made if missing, as nginx -t makes its logs
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

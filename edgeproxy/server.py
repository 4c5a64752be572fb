"""The process model: bind the listeners, serve the apps, stop cleanly on a signal."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from edgeproxy.config import Config
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
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve(config: Config) -> None:
    """Serve every configured listener in this process until SIGINT/SIGTERM."""
    if config.mirror.listen is None:
        raise SystemExit("edgeproxy: nothing to listen on: set mirror.listen")
    app = MirrorApp(config.mirror)
    host, port = config.mirror.listen
    sock = bind(host, port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="none",
            http="httptools",
            lifespan="on",
            access_log=True,
            log_config=None,
            timeout_keep_alive=120,
            server_header=False,
        )
    )
    log.info("mirror listening on %s:%d (cache %s)", host, port, config.mirror.root)
    await server.serve(sockets=[sock])


def run(config: Config) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))

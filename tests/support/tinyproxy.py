"""A real outbound HTTP proxy for tests: Debian's tinyproxy on loopback, logging each request;
as an https:// proxy behind a TLS listener of the test's (tinyproxy speaks no TLS)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port, wait_for_port

OUTGOING = "127.0.0.2"  # the address the proxy connects from


@dataclass
class Tinyproxy:
    port: int
    log_path: Path
    tls_port: int | None = None  # its TLS listener's (`tls_front`): the https:// proxy

    def url(self, credentials: tuple[str, str] | None = None) -> str:
        """The http:// proxy's URL; the https:// one's once `tls_front` runs."""
        user = f"{credentials[0]}:{credentials[1]}@" if credentials else ""
        if self.tls_port is not None:
            return f"https://{user}127.0.0.1:{self.tls_port}"
        return f"http://{user}127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines it took: `GET http://host/path HTTP/1.1`, `CONNECT host:port ...`."""
        marker = "Request (file descriptor "
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line.split("): ", 1)[1] for line in lines if marker in line]


@contextmanager
def run_tinyproxy(workdir: Path, credentials: tuple[str, str] | None = None) -> Iterator[Tinyproxy]:
    """tinyproxy on 127.0.0.1, open to loopback clients, asking for `credentials` (Basic) if
    given; any port may be CONNECTed to (no ConnectPort line). Its own connections come from
    `OUTGOING`, so an upstream's access log tells proxied requests from direct ones."""
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy is not installed (scripts/test installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    proxy = Tinyproxy(free_port(), workdir / "tinyproxy.log")
    config = workdir / "tinyproxy.conf"
    lines = [
        f"Port {proxy.port}",
        "Listen 127.0.0.1",
        "Allow 127.0.0.1",
        f"Bind {OUTGOING}",
        "Timeout 60",
        "MaxClients 64",
        f'LogFile "{proxy.log_path}"',
        "LogLevel Connect",
        "DisableViaHeader Yes",
    ]
    if credentials:
        lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
    config.write_text("\n".join(lines) + "\n")
    with (workdir / "tinyproxy.out").open("wb") as out:
        process = subprocess.Popen([binary, "-d", "-c", str(config)], stdout=out, stderr=out)
    try:
        try:
            wait_for_port("127.0.0.1", proxy.port)
        except TimeoutError:
            raise RuntimeError((workdir / "tinyproxy.out").read_text()) from None
        yield proxy
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def tls_front(proxy: Tinyproxy, certificate: Path, key: Path) -> Iterator[list[int]]:
    """Make `proxy` an https:// one until the block ends: a TLS listener on 127.0.0.1 (with
    `certificate`) relaying each connection to tinyproxy. Yields the count of TLS handshakes
    done (a one-item list, updated as they come)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    handshakes = [0]
    loop = asyncio.new_event_loop()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await writer.drain()
        except OSError:  # reset (ssl.SSLError included)
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handshakes[0] += 1  # called once the handshake succeeded
        try:
            tiny_reader, tiny_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, tiny_writer), pump(tiny_reader, writer))

    server = loop.run_until_complete(asyncio.start_server(relay, "127.0.0.1", 0, ssl=context))
    thread = threading.Thread(target=loop.run_forever, name="tls-front", daemon=True)
    thread.start()
    previous, proxy.tls_port = proxy.tls_port, server.sockets[0].getsockname()[1]

    async def stop() -> None:
        server.close()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()

    try:
        yield handshakes
    finally:
        proxy.tls_port = previous
        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

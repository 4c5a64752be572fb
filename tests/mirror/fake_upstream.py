"""An in-process registry that misbehaves on purpose: for fault injection only.

It speaks just enough HTTP/1.1 by hand (one request per connection) to cut a body in the
middle, stall, or send wrong bytes, which a well-behaved server library will not do.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgeproxy.config import config_from_dict
from edgeproxy.mirror.app import MirrorApp
from tests.support.ports import free_port, wait_for_port

# Docker schema 2: served whatever a client's Accept names (an OCI manifest goes only to a
# client that names its type, as registry:2 does; tests/e2e/test_mirror_parity.py).
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeUpstream:
    """Blobs and manifests by digest, tags by name; `faults` maps a path suffix to a fault:
    "cut" (half the body, then close), "wrong" (other bytes, same length), "stall" (headers,
    part of the body, then silence), "gzip" (the body gzip-encoded when the request accepts
    it, as a compressing proxy in front of a registry does), "trickle" (a head that never
    ends, a byte every 0.1 s: no read waits long, no answer comes), "steady" (the body 64 KiB
    every 0.05 s: a slow but healthy upstream), "redirect <url>" (a 307 there,
    as Docker Hub sends blobs to its CDN), or an HTTP status such as 500 or 429 (401 comes
    with a bearer challenge: with `tokens` set, a loop of 401s whatever the token)."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # The referrers API's descriptors by subject digest (a subject not here: 404, no API).
    referrers: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    faults: dict[str, str | int] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    # The headers of the last request by "METHOD path", their names in lowercase.
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    # The query string of the last request by "METHOD path", as sent.
    queries: dict[str, str] = field(default_factory=dict)
    # Headers added to (or replacing) those of the answers, 200 or a status fault, for a path
    # suffix; sent as UTF-8.
    answer_headers: dict[str, dict[str, str]] = field(default_factory=dict)
    port: int = 0
    # Bearer auth as Docker Hub does it, when `tokens` is not None: /token issues "t1", "t2"...
    # (valid until removed from the set); anything else under /v2/ needs a valid one.
    tokens: set[str] | None = None
    issued: int = 0
    token_answer: bytes | None = None  # what /token answers instead, when set
    realm: str | None = None  # the challenges' realm, when not this server's /token
    # A 401's WWW-Authenticate headers, one line each, instead of the one bearer challenge.
    challenges: list[str] | None = None
    # Close each connection when a second request comes on it, unanswered (tinyproxy's way
    # with an answer that did not say "Connection: close": set that in answer_headers).
    closes_when_reused: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, tag: str, layers: list[str]) -> str:
        document = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": layers[0],
                "size": len(self.blobs[layers[0]]),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": d,
                    "size": len(self.blobs[d]),
                }
                for d in layers
            ],
        }
        return self.add_document(tag, document)

    def add_document(self, tag: str, document: dict[str, object]) -> str:
        """Any manifest, index or list, tagged `tag`."""
        data = json.dumps(document).encode()
        digest = digest_of(data)
        self.manifests[digest] = data
        self.tags[tag] = digest
        return digest

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            path, _, query = target.partition("?")
            self.requests[f"{method} {path}"] += 1
            self.queries[f"{method} {path}"] = query
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines[1:] if line)
            }
            self.headers[f"{method} {path}"] = headers
            authorization = headers.get("authorization", "")
            if self.tokens is not None and not self._authorized(writer, path, authorization):
                return
            await self._respond(writer, method, path)
            if self.closes_when_reused:
                await writer.drain()
                await reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _authorized(self, writer: asyncio.StreamWriter, path: str, authorization: str) -> bool:
        assert self.tokens is not None
        if path == "/token" and isinstance(fault := self.faults.get("/token"), int):
            self._send(writer, fault, b"{}", {}, "GET")
            return False
        if path == "/token" and self.token_answer is not None:
            self._send(writer, 200, self.token_answer, {"Content-Type": "application/json"}, "GET")
            return False
        if path == "/token":
            self.issued += 1
            token = f"t{self.issued}"
            self.tokens.add(token)
            self._send(writer, 200, json.dumps({"token": token}).encode(), {}, "GET")
            return False
        if authorization.removeprefix("Bearer ") in self.tokens:
            return True
        self._send(writer, 401, b"{}", {"WWW-Authenticate": self._challenge()}, "GET")
        return False

    async def _respond(self, writer: asyncio.StreamWriter, method: str, path: str) -> None:
        fault = next((f for suffix, f in self.faults.items() if path.endswith(suffix)), None)
        extra = next((h for suffix, h in self.answer_headers.items() if path.endswith(suffix)), {})
        headers: dict[str, str | list[str]] = {}
        if isinstance(fault, int):
            if fault == 429:
                headers = {"Retry-After": "7"}
            elif fault == 401:
                headers = {"WWW-Authenticate": self._challenge()}
            return self._send(writer, fault, b'{"errors":[]}', {**headers, **extra}, method)
        if fault == "trickle":
            writer.write(b"HTTP/1.1 200 X\r\nX-Pad: ")
            while True:  # until the client leaves
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.1)
        if isinstance(fault, str) and fault.startswith("redirect "):
            return self._send(writer, 307, b"", {"Location": fault.split(" ", 1)[1]}, method)
        kind, _, ref = path.rpartition("/")
        body: bytes | None = None
        if path == "/v2/":
            body = b"{}"
        elif path.endswith("/tags/list"):
            name = path[len("/v2/") : -len("/tags/list")]
            body = json.dumps({"name": name, "tags": sorted(self.tags)}).encode()
        elif kind.endswith("/manifests"):
            digest = self.tags.get(ref, ref)
            body = self.manifests.get(digest)
            headers = {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": digest}
        elif kind.endswith("/referrers") and ref in self.referrers:
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.referrers[ref]}
            body = json.dumps(index).encode()
            headers = {"Content-Type": OCI_INDEX}
        elif kind.endswith("/blobs"):
            body = self.blobs.get(ref)
            headers = {"Content-Type": "application/octet-stream"}
        if body is None:
            return self._send(writer, 404, b'{"errors":[{"code":"NOT_FOUND"}]}', {}, method)
        if fault == "wrong":
            body = bytes(255 - b for b in body)
        accepted = self.headers[f"{method} {path}"].get("accept-encoding", "")
        if fault == "gzip" and "gzip" in accepted:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        if fault == "steady" and method == "GET":
            self._send(writer, 200, b"", {**headers, "Content-Length": str(len(body))}, method)
            for start in range(0, len(body), 64 * 1024):
                writer.write(body[start : start + 64 * 1024])
                await writer.drain()
                await asyncio.sleep(0.05)
            return None
        if fault in ("cut", "stall") and method == "GET":
            self._send(writer, 200, b"", {**headers, "Content-Length": str(len(body))}, method)
            writer.write(body[: len(body) // 2])
            await writer.drain()
            if fault == "stall":
                await asyncio.sleep(3600)
            return None
        return self._send(writer, 200, body, {**headers, **extra}, method)

    def _challenge(self) -> str | list[str]:
        if self.challenges is not None:
            return self.challenges
        return f'Bearer realm="{self.realm or self.url + "/token"}",service="fake"'

    @staticmethod
    def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        headers: dict[str, str | list[str]],
        method: str,
    ) -> None:
        """One answer; a header with a list of values is sent as one line for each."""
        headers = {"Content-Length": str(len(body)), "Connection": "close", **headers}
        lines = [f"HTTP/1.1 {status} X"] + [
            f"{k}: {v}" for k, vs in headers.items() for v in ([vs] if isinstance(vs, str) else vs)
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if method != "HEAD":
            writer.write(body)


def mirror_of(upstream: FakeUpstream, root: Path, **settings: object) -> MirrorApp:
    """A mirror whose one upstream ("fake") is `upstream`; `settings` go to the upstream."""
    entry = {"name": "fake", "url": upstream.url, **settings}
    config = config_from_dict({"mirror": {"root": str(root), "upstream": [entry]}})
    return MirrorApp(config.mirror)


@contextmanager
def fake_upstream(port: int | None = None) -> Iterator[FakeUpstream]:
    upstream = FakeUpstream(port=port or free_port())
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        async with await asyncio.start_server(upstream._handle, "127.0.0.1", upstream.port):
            await stop.wait()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # handlers that stall on purpose

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    wait_for_port("127.0.0.1", upstream.port)
    try:
        yield upstream
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)

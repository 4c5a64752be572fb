"""A fuzz run of the request router: hypothesis sends methods, paths, queries and headers
straight to a MirrorApp (as uvicorn would hand them over) in front of an in-process upstream.

Never a 500, every error the registry's JSON, every response header one a server can send,
and no file touched outside the cache root: an audit hook (`sys.addaudithook`) records every
path Python opens, creates, renames or removes while the app runs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.types import Message

from edgeproxy.config import config_from_dict
from edgeproxy.mirror.app import MirrorApp
from tests.mirror.fake_upstream import FakeUpstream, fake_upstream
from tests.support.verify import verify_cache

BLOB = bytes(range(256)) * 12
# Events that touch a path (the first argument); "open" may only read outside the root.
WRITES = {
    "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.utime", "os.chmod", "os.chown",
    "os.link", "os.symlink", "os.truncate", "shutil.rmtree", "shutil.copyfile",
}  # fmt: skip
READS = {"open", "os.listdir", "os.scandir"}
# Reads the interpreter may do on its own (imports, linecache for a logged traceback, CAs).
READABLE = tuple(
    os.path.realpath(p) + "/"
    for p in {sys.prefix, sys.base_prefix, "/usr", "/etc/ssl", str(Path(__file__).parents[2])}
)


@dataclass
class Audit:
    """Paths touched while `active`; the hook stays installed (hooks cannot be removed)."""

    active: bool = False
    touched: list[tuple[str, str, bool]] = field(default_factory=list)  # event, path, writes

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or (event not in WRITES and event not in READS) or not args:
            return
        paths = args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]
        writes = event in WRITES or (event == "open" and _opens_for_writing(args))
        for path in paths:
            if isinstance(path, str | bytes | os.PathLike):
                self.touched.append((event, os.path.realpath(os.fsdecode(path)), writes))

    def outside(self, root: Path, readable: tuple[str, ...] = ()) -> list[tuple[str, str, bool]]:
        inside = os.path.realpath(root) + "/"
        allowed = READABLE + readable
        return [
            (event, path, writes)
            for event, path, writes in self.touched
            if not (path + "/").startswith(inside) and (writes or not path.startswith(allowed))
        ]


def _opens_for_writing(args: tuple[Any, ...]) -> bool:
    mode, flags = ((*args, None, None))[1:3]
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


AUDIT = Audit()
sys.addaudithook(AUDIT.hook)


@dataclass(repr=False)  # a failing example prints the request, not the upstream's blobs
class Fuzzed:
    app: MirrorApp
    loop: asyncio.AbstractEventLoop
    upstream: FakeUpstream
    blob: str
    manifest: str
    readable: tuple[str, ...] = ()  # files outside the root the app may read (htpasswd)
    credentials: tuple[bytes, ...] = ()  # Authorization values that work


@pytest.fixture(scope="module", params=["open", "auth"])
def fuzzed(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Fuzzed]:
    """The mirror as configured by default, and with `[mirror.auth]` (htpasswd + tokens)."""
    folder = tmp_path_factory.mktemp("fuzz")
    root = folder / "cache"
    mirror: dict[str, Any] = {"root": str(root)}
    htpasswd = folder / "htpasswd"
    if request.param == "auth":
        hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
        htpasswd.write_text(f"tester:{hashed}\n")
        mirror["auth"] = {"htpasswd": str(htpasswd), "anonymous": ["library/*"]}
    with fake_upstream() as upstream:
        blob = upstream.add_blob(BLOB)
        manifest = upstream.add_manifest("latest", [blob])
        upstream.faults["/manifests/broken"] = 500
        upstream.faults["/manifests/limited"] = 429
        entries = [{"name": n, "url": upstream.url} for n in ("docker.io", "fake")]
        config = config_from_dict({"mirror": {**mirror, "upstream": entries}})
        loop = asyncio.new_event_loop()
        app = MirrorApp(config.mirror)
        fuzzed = Fuzzed(app, loop, upstream, blob, manifest)
        if request.param == "auth":
            basic = b"Basic " + base64.b64encode(b"tester:secret")
            _, _, answer = loop.run_until_complete(
                call(app, "GET", "/token", b"scope=repository:x:pull", [(b"authorization", basic)])
            )
            bearer = b"Bearer " + json.loads(answer)["token"].encode()
            fuzzed.readable, fuzzed.credentials = (str(htpasswd),), (basic, bearer)
        try:
            yield fuzzed
        finally:
            loop.run_until_complete(app.aclose())
            loop.close()
    report = verify_cache(root)
    assert (report.corrupt, report.leftovers) == ([], [])


async def call(
    app: MirrorApp,
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request as uvicorn hands it over: the path percent-decoded, headers lowercased."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": urllib.parse.quote(path).encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 5000),
    }
    sent: list[Message] = []
    finished = asyncio.Event()
    asked = False

    async def receive() -> Message:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # the client stays until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        await asyncio.wait_for(app(scope, receive, send), 60)
    finally:
        finished.set()
    start = sent[0]
    assert start["type"] == "http.response.start"
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], list(start["headers"]), body


SEGMENTS = st.sampled_from(
    [
        "x", "library", "alpine", "a", "fake", "docker.io", "..", ".", "", "%2e%2e", "%2F",
        "\x00", "\r\nX-Evil: 1", "manifests", "blobs", "tags", "list", "referrers", "_catalog",
        "uploads", "latest", "broken", "limited", "sha256:zz", "sha512:" + "a" * 128, "A",
        "a" * 300, "etc", "passwd", "/", "\\", "~root", "%00",
    ]
) | st.text(max_size=12)  # fmt: skip


def paths(blob: str, manifest: str) -> st.SearchStrategy[str]:
    known = st.sampled_from([blob, manifest, "sha256:" + "0" * 64])
    segments = SEGMENTS | known
    names = st.sampled_from(["x", "library/alpine", "fake/x", "docker.io/y", "a/b/c"])
    return st.one_of(
        st.builds(  # mostly well-formed: these reach the upstream and the cache
            lambda name, kind, ref: f"/v2/{name}/{kind}/{ref}",
            names,
            st.sampled_from(["manifests", "blobs", "referrers", "tags"]),
            st.sampled_from(["latest", "broken", "limited", "list", "v9"]) | known,
        ),
        st.lists(segments, max_size=7).map(lambda parts: "/v2/" + "/".join(parts)),
        st.builds(
            lambda name, kind, ref: f"/v2/{name}/{kind}/{ref}",
            st.lists(SEGMENTS, min_size=1, max_size=3).map("/".join),
            st.sampled_from(["manifests", "blobs", "referrers"]),
            segments,
        ),
        st.text(max_size=40).map(lambda text: "/" + text),
        st.just("/token"),  # [mirror.auth]'s token endpoint
    )


QUERY_KEYS = st.sampled_from(["ns", "n", "last", "artifactType", "digest"]) | st.text(max_size=6)
QUERY_VALUES = st.sampled_from(["fake", "docker.io", "", "0", "5", "²", "-1", "9" * 5000]) | (
    st.text(max_size=12)
)
QUERIES = st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=3).map(
    lambda pairs: urllib.parse.urlencode(pairs).encode()
) | st.binary(max_size=30)
# What an HTTP/1.1 parser lets through to the app: no CR, LF or NUL in a value.
HEADER_VALUES = st.binary(max_size=40).map(
    lambda v: v.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)
HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [b"range", b"accept", b"if-none-match", b"authorization", b"host", b"x-anything"]
        ),
        st.sampled_from([b"bytes=0-9", b"bytes=5-", b"bytes=-3", b"bytes=0-1,4-5", b"*/*"])
        | HEADER_VALUES,
    ),
    max_size=4,
)
METHODS = st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
FORM_VALUES = ["password", "tester", "secret", "repository:x:pull", "registry:catalog:*"]
FORMS = st.lists(
    st.tuples(
        st.sampled_from(["grant_type", "username", "password", "scope", "service"]),
        st.sampled_from(FORM_VALUES) | st.text(max_size=30),
    ),
    max_size=5,
).map(lambda pairs: urllib.parse.urlencode(pairs).encode()) | st.binary(max_size=100)


def authorizations(fuzzed: Fuzzed) -> st.SearchStrategy[bytes]:
    """Working credentials, and the shapes of broken ones."""
    return st.sampled_from([*fuzzed.credentials, b"Bearer x.y.z", b"Basic", b"Basic ::"]) | (
        st.binary(max_size=30).map(lambda raw: b"Basic " + base64.b64encode(raw))
    )


def servable(value: bytes) -> bool:
    """What uvicorn and h11 accept as a header value: no control characters but tab."""
    return not any((b < 0x20 and b != 0x09) or b == 0x7F for b in value)


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),  # more: a longer hunt
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_router_fuzz(fuzzed: Fuzzed, data: st.DataObject) -> None:
    method = data.draw(METHODS, "method")
    path = data.draw(paths(fuzzed.blob, fuzzed.manifest), "path")
    query = data.draw(QUERIES, "query")
    headers = data.draw(HEADERS, "headers")
    if data.draw(st.booleans(), "authorized"):
        headers.append((b"authorization", data.draw(authorizations(fuzzed), "authorization")))
    form = data.draw(FORMS, "form") if method == "POST" else b""
    AUDIT.active, AUDIT.touched = True, []
    try:
        status, response_headers, body = fuzzed.loop.run_until_complete(
            call(fuzzed.app, method, path, query, headers, form)
        )
        # A fill commits (fsync, rename) after its clients are served: let it finish here.
        if background := asyncio.all_tasks(fuzzed.loop):
            fuzzed.loop.run_until_complete(asyncio.wait(background, timeout=60))
    finally:
        AUDIT.active = False
    event(f"status {status}")
    assert status != 500 and 200 <= status < 600
    for name, value in response_headers:
        assert servable(name) and servable(value), (name, value)
    if status >= 400 and method != "HEAD":
        errors = json.loads(body)["errors"]
        assert errors and all(isinstance(e["code"], str) for e in errors)
    if status == 200 and path.endswith(f"/blobs/{fuzzed.blob}") and method == "GET":
        assert body == BLOB
    assert AUDIT.outside(fuzzed.app.config.root, fuzzed.readable) == []


def test_the_audit_sees_the_cache_being_written(fuzzed: Fuzzed) -> None:
    """The fuzz run's file check is only worth something if the hook records the fills."""
    cold = fuzzed.upstream.add_blob(b"audited" * 1000)
    AUDIT.active, AUDIT.touched = True, []
    try:
        status, _, body = fuzzed.loop.run_until_complete(
            call(fuzzed.app, "GET", f"/v2/audited/blobs/{cold}", b"", [])
        )
        if background := asyncio.all_tasks(fuzzed.loop):
            fuzzed.loop.run_until_complete(asyncio.wait(background, timeout=60))
    finally:
        AUDIT.active = False
    assert (status, body) == (200, b"audited" * 1000)
    root = os.path.realpath(fuzzed.app.config.root)
    assert any(writes and path.startswith(root) for _, path, writes in AUDIT.touched)
    assert AUDIT.outside(Path("/nonexistent"))  # and would report them elsewhere


def test_a_query_that_is_not_utf8(fuzzed: Fuzzed) -> None:
    """Found by the fuzz run: the 401's realm was built from request.url, which decodes it."""
    status, _, body = fuzzed.loop.run_until_complete(
        call(fuzzed.app, "GET", "/v2/fake/a/b/manifests/latest", b"\x80=\xff", [])
    )
    assert status == (401 if fuzzed.credentials else 200), body

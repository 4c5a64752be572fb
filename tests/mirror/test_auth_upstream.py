"""Upstream credentials go to their upstream only: never to a token realm the config did not
allow, never to a redirect's other host, never into a log line or an error body."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from edgeproxy.config import config_from_dict
from edgeproxy.mirror.app import MirrorApp
from edgeproxy.mirror.upstream import may_send_credentials
from tests.mirror.fake_upstream import MANIFEST_TYPE, fake_upstream, mirror_of
from tests.support.ports import free_port
from tests.support.servers import serve_app

USER, SECRET = "robot", "s3cr3t-upstream-password"
BASIC = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
LAYER = b"layer bytes " * 100
LAYER_DIGEST = "sha256:" + hashlib.sha256(LAYER).hexdigest()
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": LAYER_DIGEST,
                   "size": len(LAYER)},
        "layers": [],
    }
).encode()  # fmt: skip


@dataclass
class Seen:
    """The Authorization header (or None) of every request, by path, in order."""

    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def auth_of(self, path: str) -> list[str | None]:
        return [auth for p, auth in self.requests if p == path]


class Upstream:
    """A registry that asks for Basic (`scheme="basic"`) or for a token from `realm`, and
    redirects blob GETs to `cdn` (another host, as Docker Hub does to its CDN)."""

    def __init__(self, scheme: str, realm: str, cdn: str, seen: Seen) -> None:
        self.scheme, self.realm, self.cdn, self.seen = scheme, realm, cdn, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        self.seen.requests.append((request.url.path, request.headers.get("authorization")))
        response = self.answer(request)
        await response(scope, receive, send)

    def answer(self, request: Request) -> Response:
        path, auth = request.url.path, request.headers.get("authorization")
        if path == "/token":
            if auth is not None and auth != BASIC:
                return JSONResponse({"details": "bad credentials"}, status_code=401)
            return JSONResponse({"token": "granted", "expires_in": 300})
        wanted = BASIC if self.scheme == "basic" else "Bearer granted"
        if auth != wanted:
            challenge = (
                'Basic realm="upstream"'
                if self.scheme == "basic"
                else f'Bearer realm="{self.realm}",service="up"'
            )
            return JSONResponse({}, status_code=401, headers={"WWW-Authenticate": challenge})
        if path == "/v2/":
            return JSONResponse({})
        if path.endswith("/manifests/v1"):
            return Response(MANIFEST, media_type=MANIFEST_TYPE)
        if path.endswith(f"/blobs/{LAYER_DIGEST}"):
            return RedirectResponse(f"{self.cdn}/blob", status_code=307)
        return JSONResponse({"errors": []}, status_code=404)


async def cdn(scope: Scope, receive: Receive, send: Send) -> None:
    """Serves the layer to whoever asks; the test records what it was sent."""
    if scope["type"] != "http":
        return
    request = Request(scope, receive)
    CDN_SEEN.requests.append((request.url.path, request.headers.get("authorization")))
    await Response(LAYER, media_type="application/octet-stream")(scope, receive, send)


CDN_SEEN = Seen()


@dataclass
class World:
    upstream: Seen
    cdn: Seen
    client: httpx.Client


@contextmanager
def world(
    tmp_path: Path,
    scheme: str,
    realm_host: str,
    token_realms: list[str] | None = None,
    password: str = SECRET,
) -> Iterator[World]:
    """The mirror of an upstream on 127.0.0.1 whose realm is on `realm_host`; blobs redirect
    to a CDN on "localhost" (another host name for the same loopback)."""
    CDN_SEEN.requests.clear()
    seen = Seen()
    port = free_port()
    with ExitStack() as stack:
        cdn_url = stack.enter_context(serve_app(cdn)).replace("127.0.0.1", "localhost")
        upstream = Upstream(scheme, f"http://{realm_host}:{port}/token", cdn_url, seen)
        url = stack.enter_context(serve_app(upstream, port=port))
        entry: dict[str, object] = {
            "name": "up.example",
            "url": url,
            "username": USER,
            "password": password,
        }
        if token_realms is not None:
            entry["token_realms"] = token_realms
        config = config_from_dict({"mirror": {"root": str(tmp_path), "upstream": [entry]}})
        mirror = stack.enter_context(serve_app(MirrorApp(config.mirror)))
        client = stack.enter_context(httpx.Client(base_url=mirror))
        yield World(seen, CDN_SEEN, client)


def pull(client: httpx.Client) -> None:
    manifest = client.get("/v2/team/app/manifests/v1")
    assert manifest.status_code == 200, manifest.text
    blob = client.get(f"/v2/team/app/blobs/{LAYER_DIGEST}")
    assert (blob.status_code, blob.content) == (200, LAYER)


def test_a_realm_on_the_upstreams_host_gets_the_credentials(tmp_path: Path) -> None:
    with world(tmp_path, "bearer", "127.0.0.1") as w:
        pull(w.client)
        assert set(w.upstream.auth_of("/token")) == {BASIC}
        assert w.cdn.auth_of("/blob") == [None], "the CDN is another host: no token"


def test_a_realm_on_another_host_gets_no_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with world(tmp_path, "bearer", "localhost") as w:
        pull(w.client)  # an anonymous token suffices for this upstream
        assert w.upstream.auth_of("/token") and set(w.upstream.auth_of("/token")) == {None}
    assert "token realm http://localhost may not receive its credentials" in caplog.text
    assert SECRET not in caplog.text


def test_token_realms_allows_another_host(tmp_path: Path) -> None:
    with world(tmp_path, "bearer", "localhost", token_realms=["LOCALHOST"]) as w:
        pull(w.client)
        assert set(w.upstream.auth_of("/token")) == {BASIC}


def test_basic_credentials_stay_on_the_upstream(tmp_path: Path) -> None:
    with world(tmp_path, "basic", "127.0.0.1") as w:
        pull(w.client)
        assert BASIC in w.upstream.auth_of("/v2/team/app/manifests/v1")
        assert w.cdn.auth_of("/blob") == [None], "a redirect to another host drops Basic"


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_credentials_never_logged_nor_echoed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, scheme: str
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = SECRET + "-wrong"  # the upstream refuses it, so errors and logs have their say
    with world(tmp_path, scheme, "127.0.0.1", password=wrong) as w:
        answers = [
            w.client.get("/v2/team/app/manifests/v1"),
            w.client.get(f"/v2/team/app/blobs/{LAYER_DIGEST}"),
            w.client.get("/v2/team/app/tags/list"),
        ]
    encoded = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
    for answer in answers:
        assert answer.status_code == 403, answer.text
        assert answer.json()["errors"][0]["code"] == "DENIED"
        assert wrong not in answer.text and encoded not in answer.text
    assert caplog.text and wrong not in caplog.text and encoded not in caplog.text
    config = {"mirror": {"upstream": [{"name": "x", "url": "http://x", "password": wrong}]}}
    assert wrong not in repr(config_from_dict(config))


@pytest.mark.parametrize(
    ("upstream", "realm", "allowed", "expected"),
    [
        ("https://r.example", "https://r.example/token", [], True),
        ("https://r.example", "https://r.example:8443/token", [], True),
        ("https://r.example", "http://r.example/token", [], False),  # never in clear text
        ("https://r.example", "https://auth.example/token", [], False),
        ("https://r.example", "https://auth.example/token", ["auth.example"], True),
        ("https://r.example", "http://auth.example/token", ["auth.example"], False),
        ("http://r.example", "http://r.example/token", [], True),
        ("https://registry-1.docker.io", "https://auth.docker.io/token", [], True),
        ("https://registry-1.docker.io", "http://auth.docker.io/token", [], False),
        ("https://registry-1.docker.io", "https://auth.docker.io.evil.example/token", [], False),
        ("https://ghcr.io", "https://auth.docker.io/token", [], False),
    ],
)
def test_may_send_credentials(
    upstream: str, realm: str, allowed: list[str], expected: bool
) -> None:
    assert may_send_credentials(httpx.URL(upstream), httpx.URL(realm), allowed) is expected


WANTED = "repository:mirror-scope/x:pull"


async def scoped(scope: Scope, receive: Receive, send: Send) -> None:
    """Takes only a token asked for with the scope its challenge names (besides the pull
    scope of the repository); counts the token requests."""
    if scope["type"] != "http":
        return
    request = Request(scope, receive)
    if request.url.path == "/token":
        SCOPED_TOKENS.append(request.query_params.getlist("scope"))
        response: Response = JSONResponse({"token": "+".join(SCOPED_TOKENS[-1])})
    elif WANTED not in request.headers.get("authorization", "").split("+"):
        realm = f"http://127.0.0.1:{scope['server'][1]}/token"
        challenge = f'Bearer realm="{realm}",service="s",scope="{WANTED}"'
        response = JSONResponse({}, status_code=401, headers={"WWW-Authenticate": challenge})
    else:
        response = JSONResponse({"name": "x", "tags": ["v1"]})
    await response(scope, receive, send)


SCOPED_TOKENS: list[list[str]] = []


def test_the_scope_a_challenge_names_is_asked_for(tmp_path: Path) -> None:
    """containerd adds a 401's scope to its token request; the mirror asked for the pull scope
    only, and was refused by a registry that wants another."""
    SCOPED_TOKENS.clear()
    with serve_app(scoped) as upstream:
        config = config_from_dict(
            {"mirror": {"root": str(tmp_path), "upstream": [{"name": "up", "url": upstream}]}}
        )
        with serve_app(MirrorApp(config.mirror)) as url, httpx.Client(base_url=url) as client:
            for _ in range(3):
                tags = client.get("/v2/x/tags/list")
                assert (tags.status_code, tags.json()["tags"]) == (200, ["v1"]), tags.text
    # The first token asked for with the challenge's scope serves the later requests too.
    assert SCOPED_TOKENS[-1] == ["repository:x:pull", WANTED]
    assert len(SCOPED_TOKENS) <= 2


@pytest.mark.parametrize(
    "challenges",
    [
        ['Basic realm="x", Bearer realm="{token}",service="fake"'],
        ['Bearer realm="{token}",service="fake", Basic realm="x"'],
        ['Basic realm="x"', 'Bearer realm="{token}",service="fake"'],
    ],
)
@pytest.mark.parametrize("username", ["", USER])
def test_bearer_is_taken_among_several_challenges(
    tmp_path: Path, challenges: list[str], username: str
) -> None:
    """Several challenges, in one WWW-Authenticate or in several: Bearer is taken when offered,
    as Docker and registry:2's proxy (Go's challenge package, a token handler first) do, with
    its own parameters; Basic only when there is no Bearer."""
    with fake_upstream() as upstream:
        upstream.tokens = set()
        upstream.challenges = [c.format(token=f"{upstream.url}/token") for c in challenges]
        first, second = upstream.add_blob(b"one"), upstream.add_blob(b"two")
        upstream.add_manifest("v1", [first])
        mirror = mirror_of(upstream, tmp_path, username=username, password=SECRET)
        with serve_app(mirror) as url, httpx.Client(base_url=url) as client:
            assert client.get("/v2/a/b/manifests/v1").status_code == 200
            assert client.get(f"/v2/a/b/blobs/{first}").content == b"one"
            upstream.tokens.clear()  # the blob's own 401 is read as well
            assert client.get(f"/v2/a/b/blobs/{second}").content == b"two"
        assert upstream.issued == 2

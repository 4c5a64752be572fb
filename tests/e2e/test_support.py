"""The test-support layer works: real registries, the token server, built and pushed images."""

from __future__ import annotations

import base64
import filecmp
import gzip
import hashlib
import io
import json
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.support.images import (
    MT_INDEX,
    Image,
    Pushed,
    RandomLayer,
    build_image,
    push,
    random_layer,
)
from tests.support.ports import wait_for_port
from tests.support.registry import Registry, start_registry
from tests.support.skopeo import SkopeoError, skopeo, skopeo_inspect_raw
from tests.support.tokenserver import TokenServer

PushAll = Callable[[Registry], dict[str, Pushed]]
KID = re.compile(r"^[A-Z2-7]{4}(:[A-Z2-7]{4}){11}$")


def sha256(data: bytes) -> str:
    """The OCI digest of `data`."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def token_call(
    server: TokenServer,
    *,
    query: str = "",
    form: dict[str, str] | None = None,
    basic: tuple[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """GET `realm?query` (optionally with Basic credentials), or POST `form`; (status, JSON)."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(f"{server.realm}?{query}", data=data)
    if basic is not None:
        encoded = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {encoded}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def granted(server: TokenServer, token: str) -> list[Any]:
    """The verified `access` claim of a token."""
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["kid"] == server.key_id
    assert KID.match(header["kid"])
    claims = jwt.decode(token, server.public_key(), algorithms=["RS256"], audience=server.service)
    assert claims["iss"] == server.issuer
    access: list[Any] = claims["access"]
    return access


def test_random_layer_is_a_deterministic_tar(tmp_path: Path) -> None:
    """Layers are valid gzipped tars, the same in memory and streamed, with real diff_ids."""
    layer = random_layer(3000, seed=7)
    assert layer == random_layer(3000, seed=7)
    assert layer != random_layer(3000, seed=8)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        (member,) = tar.getmembers()
        assert member.size == 3000
    image = build_image(tmp_path, "t", [RandomLayer(3000, seed=7)])
    assert image.blob_path(image.layer_digests[0]).read_bytes() == layer
    config = json.loads(image.blob_path(image.config_digest or "").read_bytes())
    assert config["rootfs"]["diff_ids"] == [sha256(gzip.decompress(layer))]


def test_token_server_flows(tmp_path: Path) -> None:
    """GET and OAuth2 POST grants, refresh tokens, refusals and the request record."""
    server = TokenServer(tmp_path, {"alice": "secret"}, expires_in=42)
    try:
        service = f"service={server.service}"
        scope = "scope=repository:a/b:pull,push&scope=repository:c:pull"
        status, body = token_call(server, query=f"{service}&{scope}")
        assert status == 200
        assert body["expires_in"] == 42
        assert "refresh_token" not in body
        assert granted(server, body["token"]) == [
            {"type": "repository", "name": "a/b", "actions": ["pull"]},
            {"type": "repository", "name": "c", "actions": ["pull"]},
        ]

        status, body = token_call(server, query=f"{service}&{scope}", basic=("alice", "secret"))
        assert status == 200
        assert granted(server, body["access_token"])[0]["actions"] == ["pull", "push"]
        assert token_call(server, query=scope, basic=("alice", "wrong"))[0] == 401

        form = {"grant_type": "password", "username": "alice", "password": "secret"}
        form |= {"service": server.service, "scope": "repository:a/b:pull repository:c:push"}
        status, body = token_call(server, form=form | {"access_type": "offline"})
        assert status == 200
        assert [a["actions"] for a in granted(server, body["token"])] == [["pull"], ["push"]]
        refresh = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
        status, body = token_call(server, form=refresh | {"scope": "repository:a/b:push"})
        assert status == 200
        assert granted(server, body["token"])[0]["actions"] == ["push"]
        assert token_call(server, form=form | {"password": "wrong"})[0] == 401
        assert token_call(server, form=refresh | {"refresh_token": "forged"})[0] == 401

        assert server.token_requests == 7
        assert [r.status for r in server.requests] == [200, 200, 401, 200, 200, 401, 401]
        assert [r.user for r in server.requests[:2]] == [None, "alice"]
        assert server.requests[4].grant_type == "refresh_token"
    finally:
        server.close()


@pytest.mark.e2e
@pytest.mark.parametrize("fixture", ["registry_none", "registry_htpasswd", "registry_token"])
def test_pushed_images_read_back(
    fixture: str, request: pytest.FixtureRequest, push_all: PushAll
) -> None:
    """Every test image reads back from each registry with the digest it was built with."""
    registry: Registry = request.getfixturevalue(fixture)
    pushed = push_all(registry)
    assert {p.repo for p in pushed.values()} == {"test/small", "test/multi", "test/multiarch"}
    for p in pushed.values():
        ref = f"docker://{registry.host}/{p.repo}"
        raw = skopeo_inspect_raw(f"{ref}:{p.tag}", creds=registry.creds)
        assert sha256(raw) == p.image.manifest_digest
        assert json.loads(raw)["mediaType"] == p.image.media_type
        for child in p.image.children:
            raw = skopeo_inspect_raw(f"{ref}@{child.manifest_digest}", creds=registry.creds)
            assert sha256(raw) == child.manifest_digest
    assert pushed["multiarch"].image.media_type == MT_INDEX
    assert len(pushed["multiarch"].image.children) == 2


@pytest.mark.e2e
@pytest.mark.parametrize("fixture", ["registry_htpasswd", "registry_token"])
def test_anonymous_push_is_refused(
    fixture: str, request: pytest.FixtureRequest, test_images: dict[str, Image]
) -> None:
    """Registries with auth refuse an anonymous push."""
    registry: Registry = request.getfixturevalue(fixture)
    with pytest.raises(SkopeoError, match="authentication required"):
        push(test_images["small"], registry, "test/anonymous", anonymous=True)


@pytest.mark.e2e
def test_anonymous_token_pull(registry_token: Registry, push_all: PushAll) -> None:
    """An anonymous client gets a pull token and reads the manifest."""
    image = push_all(registry_token)["small"].image
    server = registry_token.token_server
    assert server is not None
    before = server.token_requests
    raw = skopeo_inspect_raw(f"docker://{registry_token.host}/test/small:v1")
    assert sha256(raw) == image.manifest_digest
    answered = server.requests[before:]
    assert answered
    assert all(r.user is None and r.status == 200 for r in answered)
    assert any("repository:test/small:pull" in r.scopes for r in answered)


@pytest.mark.e2e
def test_stop_start_keeps_data(tmp_path: Path, test_images: dict[str, Image]) -> None:
    """A stopped registry stops listening; restarted, it serves what it stored and logged."""
    registry = start_registry(tmp_path / "registry")
    try:
        image = push(test_images["small"], registry, "test/restart").image
        registry.stop()
        with pytest.raises(TimeoutError):
            wait_for_port("127.0.0.1", registry.port, timeout=0.2)
        registry.start()
        raw = skopeo_inspect_raw(f"docker://{registry.host}/test/restart:v1")
        assert sha256(raw) == image.manifest_digest
        assert registry.count("PUT", "/test/restart/manifests/v1") == 1
    finally:
        registry.close()


def pull_to_layout(registry: Registry, repo_tag: str, layout: Path) -> None:
    """skopeo copy an image from `registry` into an OCI layout, anonymously."""
    source = f"docker://{registry.host}/{repo_tag}"
    skopeo("copy", "--src-tls-verify=false", "--src-no-creds", source, f"oci:{layout}:v1")


@pytest.mark.e2e
def test_count_blob_downloads(registry_none: Registry, push_all: PushAll, tmp_path: Path) -> None:
    """The access log counts each blob a pull downloads, with its status, size and client."""
    image = push_all(registry_none)["multi"].image
    blobs = [*image.layer_digests, image.config_digest]
    before = {d: registry_none.count("GET", f"/blobs/{d}") for d in blobs}
    pull_to_layout(registry_none, "test/multi:v1", tmp_path / "out")
    for digest in blobs:
        assert registry_none.wait_count("GET", f"/blobs/{digest}", before[digest] + 1) == (
            before[digest] + 1
        )
    big = image.layer_digests[1]
    copied = tmp_path / "out" / "blobs" / "sha256" / big.removeprefix("sha256:")
    assert filecmp.cmp(copied, image.blob_path(big), shallow=False)
    entries = [e for e in registry_none.access_log() if e.path.endswith(f"/blobs/{big}")]
    assert entries[-1].status == 200
    assert entries[-1].size == image.blob_path(big).stat().st_size
    assert entries[-1].user_agent.startswith("skopeo/")


@pytest.mark.e2e
def test_proxy_mode_mirrors_a_token_upstream(
    tmp_path: Path, registry_token: Registry, push_all: PushAll
) -> None:
    """registry:2 in proxy mode pulls from a token-auth upstream with credentials."""
    image = push_all(registry_token)["multi"].image
    mirror = start_registry(
        tmp_path / "mirror",
        remote=registry_token.url,
        remote_username=registry_token.username,
        remote_password=registry_token.password,
    )
    try:
        raw = skopeo_inspect_raw(f"docker://{mirror.host}/test/multi:v1")
        assert sha256(raw) == image.manifest_digest
        layer = f"/blobs/{image.layer_digests[1]}"
        upstream_before = registry_token.count("GET", layer)
        pull_to_layout(mirror, "test/multi:v1", tmp_path / "out")
        # registry:2.8 fetches a cold blob twice: once to store it, once to stream it.
        assert registry_token.wait_count("GET", layer, upstream_before + 2) == upstream_before + 2
        assert mirror.wait_count("GET", layer, 1) == 1
    finally:
        mirror.close()

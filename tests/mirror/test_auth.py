"""The mirror's access control: htpasswd users, its own bearer tokens, anonymous rules."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import jwt
import pytest

from edgeproxy.config import AuthConfig, ConfigError, config_from_dict, load_config
from edgeproxy.mirror.app import MirrorApp
from edgeproxy.mirror.auth import (
    KEY_FILE,
    Access,
    Authenticator,
    Htpasswd,
    exposed_credentials,
    signing_key,
)
from edgeproxy.server import bind_listeners
from tests.mirror.fake_upstream import FakeUpstream, fake_upstream
from tests.support.htpasswd import htpasswd_entry
from tests.support.servers import serve_app, write_toml

USER, PASSWORD = "alice", "correct horse"


def basic(user: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Setup:
    upstream: FakeUpstream
    client: httpx.Client
    root: Path
    htpasswd: Path

    def token(self, *scopes: str, creds: tuple[str, str] | None = (USER, PASSWORD)) -> str:
        headers = basic(*creds) if creds else {}
        params: list[tuple[str, str | int | float | bool | None]] = [("service", "edgeproxy")]
        params += [("scope", scope) for scope in scopes]
        response = self.client.get("/token", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return str(response.json()["token"])


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(htpasswd_entry(USER, PASSWORD))
    with fake_upstream() as upstream:
        layer = upstream.add_blob(b"layer bytes")
        upstream.add_manifest("v1", [layer])
        config = config_from_dict(
            {
                "mirror": {
                    "root": str(tmp_path / "cache"),
                    "upstream": [
                        {"name": "docker.io", "url": upstream.url},
                        {"name": "open.example", "url": upstream.url},
                    ],
                    "auth": {
                        "htpasswd": str(htpasswd),
                        "anonymous": ["public/*"],
                        "anonymous_upstreams": ["open.example"],
                    },
                }
            }
        )
        with serve_app(MirrorApp(config.mirror)) as url, httpx.Client(base_url=url) as client:
            yield Setup(upstream, client, tmp_path / "cache", htpasswd)


def assert_challenge(response: httpx.Response, scope: str | None) -> None:
    assert response.status_code == 401
    expected = (
        f'Bearer realm="{response.request.url.scheme}://{response.request.url.netloc.decode()}'
    )
    expected += '/token",service="edgeproxy"'
    if scope is not None:
        expected += f',scope="{scope}"'
    assert response.headers["www-authenticate"] == expected
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"


def test_base_needs_credentials(setup: Setup) -> None:
    assert_challenge(setup.client.get("/v2/"), None)
    assert setup.client.get("/v2/", headers=basic(USER, PASSWORD)).status_code == 200
    assert setup.client.get("/v2/", headers=bearer(setup.token())).status_code == 200


def test_repository_needs_credentials(setup: Setup) -> None:
    response = setup.client.get("/v2/private/app/manifests/v1")
    assert_challenge(response, "repository:private/app:pull")
    detail = response.json()["errors"][0]["detail"]
    assert detail == [{"Type": "repository", "Name": "private/app", "Action": "pull"}]
    assert setup.upstream.requests == {}, "nothing reaches the upstream unauthenticated"
    head = setup.client.head("/v2/private/app/manifests/v1")
    assert head.status_code == 401 and "www-authenticate" in head.headers
    assert_challenge(setup.client.get("/v2/_catalog"), "registry:catalog:*")


@pytest.mark.parametrize(
    "creds", [(USER, "wrong"), ("mallory", PASSWORD), (USER, ""), (USER, PASSWORD + "x")]
)
def test_wrong_basic_credentials(setup: Setup, creds: tuple[str, str]) -> None:
    response = setup.client.get("/v2/private/app/manifests/v1", headers=basic(*creds))
    assert_challenge(response, "repository:private/app:pull")
    assert creds[1] not in response.text or not creds[1]


def test_malformed_authorization_is_a_401(setup: Setup) -> None:
    for value in ["Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(), "Bearer x.y.z"]:
        response = setup.client.get("/v2/", headers={"Authorization": value})
        assert_challenge(response, None)


def test_basic_credentials_pull(setup: Setup) -> None:
    response = setup.client.get("/v2/private/app/manifests/v1", headers=basic(USER, PASSWORD))
    assert response.status_code == 200
    digest = setup.upstream.tags["v1"]
    assert response.headers["docker-content-digest"] == digest


def test_token_flow(setup: Setup) -> None:
    token = setup.token("repository:private/app:pull")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == USER
    assert claims["access"] == [{"type": "repository", "name": "private/app", "actions": ["pull"]}]
    path = "/v2/private/app/manifests/v1"
    assert setup.client.get(path, headers=bearer(token)).status_code == 200
    # A token is good for the scopes it names only.
    other = setup.client.get("/v2/private/other/manifests/v1", headers=bearer(token))
    assert_challenge(other, "repository:private/other:pull")
    # push is never granted: the mirror is read-only.
    push = setup.token("repository:private/app:push")
    assert jwt.decode(push, options={"verify_signature": False})["access"] == []


def test_anonymous_token_grants_nothing_private(setup: Setup) -> None:
    token = setup.token("repository:private/app:pull", creds=None)
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == ""
    response = setup.client.get("/v2/private/app/manifests/v1", headers=bearer(token))
    assert_challenge(response, "repository:private/app:pull")
    # The API base checks only that the token is one of ours, as registry:2's token auth.
    assert setup.client.get("/v2/", headers=bearer(token)).status_code == 200


def test_forged_and_expired_tokens_are_refused(setup: Setup) -> None:
    claims: dict[str, Any] = {
        "iss": "edgeproxy",
        "sub": USER,
        "aud": "edgeproxy",
        "exp": 4102444800,
        "access": [{"type": "repository", "name": "private/app", "actions": ["pull"]}],
    }
    forged = jwt.encode(claims, os.urandom(32), algorithm="HS256")
    path = "/v2/private/app/manifests/v1"
    assert setup.client.get(path, headers=bearer(forged)).status_code == 401
    key = (setup.root / KEY_FILE).read_bytes()
    expired = jwt.encode({**claims, "exp": 1}, key, algorithm="HS256")
    assert setup.client.get(path, headers=bearer(expired)).status_code == 401
    other_audience = jwt.encode({**claims, "aud": "elsewhere"}, key, algorithm="HS256")
    assert setup.client.get(path, headers=bearer(other_audience)).status_code == 401
    unsigned = jwt.encode(claims, "", algorithm="none")
    assert setup.client.get(path, headers=bearer(unsigned)).status_code == 401
    good = jwt.encode(claims, key, algorithm="HS256")
    assert setup.client.get(path, headers=bearer(good)).status_code == 200


def test_token_endpoint_refuses_wrong_password(setup: Setup) -> None:
    response = setup.client.get(
        "/token", params={"scope": "repository:x:pull"}, headers=basic(USER, "wrong")
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="edgeproxy"'
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert "wrong" not in response.text


def test_oauth2_password_grant(setup: Setup) -> None:
    """containerd POSTs the OAuth2 form when it has credentials."""
    form = {
        "grant_type": "password",
        "username": USER,
        "password": PASSWORD,
        "service": "edgeproxy",
        "scope": "repository:private/app:pull",
        "client_id": "containerd-client",
    }
    response = setup.client.post("/token", data=form)
    assert response.status_code == 200
    token = response.json()["access_token"]
    path = "/v2/private/app/manifests/v1"
    assert setup.client.get(path, headers=bearer(token)).status_code == 200
    refused = setup.client.post("/token", data={**form, "password": "nope"})
    assert refused.status_code == 401
    unsupported = setup.client.post("/token", data={**form, "grant_type": "refresh_token"})
    assert unsupported.status_code == 400


@pytest.mark.parametrize(
    "path",
    [
        "/v2/public/app/manifests/v1",  # the pattern "public/*"
        "/v2/public/app/sub/manifests/v1",  # fnmatch's "*" crosses "/"
        "/v2/open.example/any/thing/manifests/v1",  # an anonymous upstream, by prefix
        "/v2/any/thing/manifests/v1?ns=open.example",  # ... and by containerd's ns
    ],
)
def test_anonymous_rules(setup: Setup, path: str) -> None:
    assert setup.client.get(path).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v2/publicity/manifests/v1",
        "/v2/any/thing/manifests/v1?ns=docker.io",
        "/v2/open.example/manifests/v1",  # a one-component name of the default upstream
    ],
)
def test_not_anonymous(setup: Setup, path: str) -> None:
    assert setup.client.get(path).status_code == 401


def test_htpasswd_is_read_again_when_it_changes(setup: Setup) -> None:
    assert setup.client.get("/v2/", headers=basic("bob", "pw2")).status_code == 401
    setup.htpasswd.write_bytes(setup.htpasswd.read_bytes() + htpasswd_entry("bob", "pw2"))
    os.utime(setup.htpasswd, ns=(0, setup.htpasswd.stat().st_mtime_ns + 10**9))
    assert setup.client.get("/v2/", headers=basic("bob", "pw2")).status_code == 200


def test_htpasswd_skips_what_is_not_bcrypt(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    md5 = htpasswd_entry("md5user", "pw", flag="-m")
    path.write_bytes(md5 + b"# a comment\n" + htpasswd_entry("b", "pw"))
    htpasswd = Htpasswd(path)
    assert not htpasswd.verify("md5user", "pw")
    assert htpasswd.verify("b", "pw")
    assert not htpasswd.verify("b", "PW")


def test_an_unknown_user_costs_what_a_known_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashed at cost 10 (`htpasswd -B -C 10`), a wrong password takes ~0.1 s: an unknown
    user must too, or the time of an answer tells which users exist."""
    path = tmp_path / "htpasswd"
    path.write_bytes(b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(10)) + b"\n")
    checked: list[bytes] = []
    checkpw = bcrypt.checkpw

    def recording_checkpw(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", recording_checkpw)
    htpasswd = Htpasswd(path)
    assert not htpasswd.verify("alice", "wrong")
    assert not htpasswd.verify("mallory", "pw"), "alice's password is not mallory's"
    assert [hashed[:7] for hashed in checked] == [b"$2b$10$", b"$2b$10$"]


def test_signing_key_is_shared_and_private(tmp_path: Path) -> None:
    first = signing_key(tmp_path)
    assert signing_key(tmp_path) == first, "a second worker reads the same key"
    assert len(first) == 32
    mode = stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode)
    assert mode == 0o600
    assert [p.name for p in (tmp_path / KEY_FILE).parent.iterdir()] == ["auth.key"]


def test_config(tmp_path: Path) -> None:
    (tmp_path / "htpasswd").write_bytes(b"")
    base = {"root": "cache", "upstream": [{"name": "docker.io", "url": "https://r.example"}]}
    config = load_config(
        write_toml(tmp_path / "proxy.toml", {"mirror": {**base, "auth": {"htpasswd": "htpasswd"}}})
    )
    assert config.mirror.auth == AuthConfig(htpasswd=tmp_path / "htpasswd")
    assert config.mirror.auth.token_ttl == 300.0
    bad = {"mirror": {**base, "auth": {"htpasswd": "h", "anonymous_upstreams": ["nope"]}}}
    with pytest.raises(ConfigError, match="no such upstream: nope"):
        load_config(write_toml(tmp_path / "bad.toml", bad))
    userinfo = {"mirror": {"upstream": [{"name": "x", "url": "https://u:secret@r.example"}]}}
    with pytest.raises(ConfigError, match=r"mirror\.upstream\.0\.url") as info:
        load_config(write_toml(tmp_path / "userinfo.toml", userinfo))
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("auth", "key"),
    [
        ({"service": 'my"registry'}, "service"),  # would end the challenge's quoted string
        ({"service": "a\nb"}, "service"),
        ({"service": ""}, "service"),
        ({"realm": "mirror.example.com/token"}, "realm"),  # clients need the scheme
        ({"realm": 'https://x/token",service="other'}, "realm"),
    ],
)
def test_a_service_or_realm_that_breaks_the_challenge_is_refused(
    tmp_path: Path, auth: dict[str, str], key: str
) -> None:
    def config(**auth: str) -> Path:
        upstream = {"name": "docker.io", "url": "https://r.example"}
        mirror = {"upstream": [upstream], "auth": {"htpasswd": "h", **auth}}
        return write_toml(tmp_path / "proxy.toml", {"mirror": mirror})

    with pytest.raises(ConfigError, match=rf"mirror\.auth\.{key}: "):
        load_config(config(**auth))
    load_config(config(realm="https://auth.example:8443/v2/token", service="mirror.example"))


def test_run_refuses_a_missing_htpasswd(tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "mirror": {
                "listen": "127.0.0.1:0",
                "upstream": [{"name": "docker.io", "url": "https://r.example"}],
                "auth": {"htpasswd": str(tmp_path / "missing")},
            }
        }
    )
    with pytest.raises(SystemExit, match=r"mirror\.auth\.htpasswd: cannot read .*missing"):
        bind_listeners(config)


def test_a_remembered_token_is_verified_again_once_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "htpasswd").write_bytes(b"")
    authenticator = Authenticator(AuthConfig(htpasswd=tmp_path / "htpasswd"), tmp_path)
    token = authenticator._issue(USER, ["repository:a/b:pull"])["token"]
    access = Access("repository:a/b:pull", anonymous=False)
    decoded: list[str] = []
    decode = jwt.decode

    def counting_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    assert authenticator._token_grants(token, access)
    assert authenticator._token_grants(token, access)
    assert len(decoded) == 1, "the second check came from memory"
    later = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: later)
    authenticator._token_grants(token, access)
    assert len(decoded) == 2, "an expired remembered token is checked again (and refused)"


def test_a_flood_of_wrong_passwords_leaves_the_threads_pulls_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bcrypt takes ~0.5 s a check at cost 12: wrong passwords sent faster than that must not
    take the threads that read cold blobs, commit fills and probe the storage."""
    (tmp_path / "htpasswd").write_bytes(htpasswd_entry(USER, PASSWORD))
    authenticator = Authenticator(AuthConfig(htpasswd=tmp_path / "htpasswd"), tmp_path)
    released = threading.Event()

    def slow_checkpw(password: bytes, hashed: bytes) -> bool:
        released.wait()
        return False

    monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)

    async def flood_then_read() -> list[str | None]:
        wrong = [base64.b64encode(f"{USER}:wrong{n}".encode()).decode() for n in range(40)]
        checks = [asyncio.create_task(authenticator._basic_user(pair)) for pair in wrong]
        await asyncio.sleep(0)  # every check is waiting for bcrypt now
        try:  # what a cold blob read does
            assert await asyncio.wait_for(asyncio.to_thread(lambda: b"read"), 20) == b"read"
        finally:
            released.set()
        return await asyncio.gather(*checks)

    assert asyncio.run(flood_then_read()) == [None] * 40


@pytest.mark.parametrize("host", ['evil",service="x', "a b", ""])
def test_a_strange_host_never_shapes_the_challenge(setup: Setup, host: str) -> None:
    response = setup.client.get("/v2/", headers={"Host": host})
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge == 'Bearer realm="http://localhost/token",service="edgeproxy"'


def test_a_host_name_with_an_underscore_is_the_realm(setup: Setup) -> None:
    """docker compose names services so ("registry_mirror"); nginx takes them as Host too."""
    response = setup.client.get("/v2/", headers={"Host": "registry_mirror:5000"})
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="http://registry_mirror:5000/token"')


def test_the_realm_is_where_a_proxy_on_another_host_was_reached(setup: Setup) -> None:
    """nginx on another host (the seed's `proxy_pass http://mirror:5000`) terminates TLS and
    says so in X-Forwarded-Proto: the client must be sent to https for its password, never to
    plain http. (uvicorn believes forwarded headers from 127.0.0.1 only.)"""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=setup.client.base_url, transport=transport) as client:
        forwarded = {"Host": "mirror.example", "X-Forwarded-Proto": "https"}
        challenge = client.get("/v2/", headers=forwarded).headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="https://mirror.example/token"')
        # Behind a proxy that names the host in X-Forwarded-Host (the first one: its client's).
        renamed = {**forwarded, "X-Forwarded-Host": "public.example:8443, inner"}
        challenge = client.get("/v2/", headers=renamed).headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="https://public.example:8443/token"')
        odd = {"X-Forwarded-Proto": "gopher", "X-Forwarded-Host": 'x"y', "Host": "m.example"}
        challenge = client.get("/v2/", headers=odd).headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="http://m.example/token"')


def test_exposed_upstream_credentials_are_warned_about() -> None:
    def warnings(auth: dict[str, Any] | None) -> list[str]:
        upstreams = [
            {
                "name": "private.example",
                "url": "https://p.example",
                "username": "u",
                "password": "p",
            },
            {"name": "public.example", "url": "https://q.example"},
        ]
        mirror: dict[str, Any] = {"upstream": upstreams}
        if auth is not None:
            mirror["auth"] = {"htpasswd": "h", **auth}
        return exposed_credentials(config_from_dict({"mirror": mirror}).mirror)

    assert warnings(None) == [
        "upstream private.example has credentials and [mirror.auth] is not set: "
        "whoever reaches the mirror may pull what they can"
    ]
    assert warnings({}) == []
    assert warnings({"anonymous_upstreams": ["public.example"]}) == []
    assert "anonymous_upstreams" in warnings({"anonymous_upstreams": ["private.example"]})[0]
    assert "patterns" in warnings({"anonymous": ["library/*"]})[0]
    assert "hunter2" not in " ".join(warnings(None) + warnings({"anonymous": ["*"]}))

"""The mirror's access control with real clients: skopeo and podman log in to edgeproxy (its
htpasswd users, its own token realm) and pull through it from the real registry."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.containerd import run_containerd
from tests.support.dockerd import Dockerd
from tests.support.edge import ca_dir, make_certificate, run_edge
from tests.support.htpasswd import htpasswd_entry
from tests.support.images import Pushed
from tests.support.ports import free_port
from tests.support.registry import Registry, start_registry
from tests.support.servers import EdgeproxyProcess, run_edgeproxy, write_toml
from tests.support.skopeo import SkopeoError, skopeo

pytestmark = pytest.mark.e2e

USER, PASSWORD = "puller", "mirror-pass-123"


def upstream_entry(registry: Registry, host: str = "127.0.0.1") -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "docker.io", "url": f"http://{host}:{registry.port}"}
    if registry.creds:
        entry["username"], entry["password"] = registry.creds
    return entry


def auth_section(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(htpasswd_entry(USER, PASSWORD))
    return {"htpasswd": str(htpasswd), **extra}


def copy(mirror: EdgeproxyProcess, repo: str, destination: Path, *creds: str) -> str:
    """`skopeo copy` from the mirror with `creds` (skopeo options); the pulled digest."""
    skopeo(
        "copy", "--src-tls-verify=false", "--preserve-digests", *creds,
        f"docker://{mirror.host}/{repo}", f"oci:{destination}:v1",
    )  # fmt: skip
    index = json.loads((destination / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


@pytest.fixture
def pushed(
    registry_none: Registry, push_all: Callable[[Registry], dict[str, Pushed]]
) -> dict[str, Pushed]:
    return push_all(registry_none)


def test_skopeo_login_and_pull(
    registry_none: Registry, pushed: dict[str, Pushed], tmp_path: Path
) -> None:
    small = pushed["small"]
    with run_edgeproxy(
        tmp_path, [upstream_entry(registry_none)], auth=auth_section(tmp_path)
    ) as mirror:
        challenge = httpx.get(f"{mirror.url}/v2/")
        assert challenge.status_code == 401
        assert challenge.headers["www-authenticate"] == (
            f'Bearer realm="http://{mirror.host}/token",service="edgeproxy"'
        )
        authfile = tmp_path / "auth.json"
        login = ["login", "--tls-verify=false", "--authfile", str(authfile), "-u", USER]
        with pytest.raises(SkopeoError) as refused:
            skopeo(*login, "-p", "wrong", mirror.host)
        assert "invalid username/password" in refused.value.stderr
        skopeo(*login, "-p", PASSWORD, mirror.host)
        with_file = copy(
            mirror, f"{small.repo}:v1", tmp_path / "a", "--src-authfile", str(authfile)
        )
        assert with_file == small.image.manifest_digest
        creds = ["--src-creds", f"{USER}:{PASSWORD}"]
        assert copy(mirror, f"{small.repo}:v1", tmp_path / "b", *creds) == with_file
        for denied, message in [
            (["--src-no-creds"], "unauthorized: authentication required"),
            (["--src-creds", f"{USER}:nope"], "unauthorized: incorrect username or password"),
        ]:
            with pytest.raises(SkopeoError) as error:
                copy(mirror, f"{small.repo}:v1", tmp_path / "c", *denied)
            assert message in error.value.stderr
        log = mirror.log()
    assert PASSWORD not in log and "nope" not in log
    assert '"GET /token?' in log  # skopeo took its tokens from the mirror's realm


def test_anonymous_pattern(
    registry_none: Registry, pushed: dict[str, Pushed], tmp_path: Path
) -> None:
    small, multi = pushed["small"], pushed["multi"]
    auth = auth_section(tmp_path, anonymous=[small.repo])
    with run_edgeproxy(tmp_path, [upstream_entry(registry_none)], auth=auth) as mirror:
        digest = copy(mirror, f"{small.repo}:v1", tmp_path / "open", "--src-no-creds")
        assert digest == small.image.manifest_digest
        with pytest.raises(SkopeoError) as error:
            copy(mirror, f"{multi.repo}:v1", tmp_path / "closed", "--src-no-creds")
        assert "unauthorized: authentication required" in error.value.stderr
        creds = ["--src-creds", f"{USER}:{PASSWORD}"]
        assert copy(mirror, f"{multi.repo}:v1", tmp_path / "mine", *creds) == (
            multi.image.manifest_digest
        )


def test_podman_login_and_pull(
    registry_none: Registry,
    pushed: dict[str, Pushed],
    tmp_path: Path,
    podman: list[str],
) -> None:
    small = pushed["small"]
    with run_edgeproxy(
        tmp_path, [upstream_entry(registry_none)], auth=auth_section(tmp_path)
    ) as mirror:
        authfile = tmp_path / "podman-auth.json"
        authfile.write_text('{"auths": {}}')  # podman's own only: no ambient login

        def run_podman(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*podman, *args], capture_output=True, text=True, timeout=300, check=False,
                env={**os.environ, "REGISTRY_AUTH_FILE": str(authfile)},
            )  # fmt: skip

        login = ["login", "--tls-verify=false", "-u", USER]
        wrong = run_podman(*login, "-p", "wrong", mirror.host)
        assert wrong.returncode != 0
        assert "invalid username/password" in wrong.stderr.lower(), wrong.stderr
        anonymous = run_podman("pull", "--tls-verify=false", f"{mirror.host}/{small.repo}:v1")
        assert anonymous.returncode != 0
        assert "unauthorized" in anonymous.stderr.lower(), anonymous.stderr
        ok = run_podman(*login, "-p", PASSWORD, mirror.host)
        assert ok.returncode == 0, ok.stderr
        pulled = run_podman("pull", "--tls-verify=false", f"{mirror.host}/{small.repo}:v1")
        assert pulled.returncode == 0, pulled.stderr
        images = run_podman("images", "--digests", "--format", "{{.Digest}}")
        assert small.image.manifest_digest in images.stdout
        assert PASSWORD not in mirror.log()


@pytest.fixture(scope="module")
def registry_token_own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A token-auth registry of this module's own: the tests count its token requests."""
    registry = start_registry(tmp_path_factory.mktemp("registry-token-own"), "token")
    yield registry
    registry.close()


@pytest.mark.parametrize("allowed", [False, True])
def test_upstream_token_realm_on_another_host(
    registry_token_own: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
    allowed: bool,
) -> None:
    """The upstream is reached as "localhost", its token realm is on "127.0.0.1": another
    host, which gets the upstream's password only when token_realms lists it."""
    registry = registry_token_own
    small = push_all(registry)["small"]
    token_server = registry.token_server
    assert token_server is not None
    entry = upstream_entry(registry, host="localhost")
    if allowed:
        entry["token_realms"] = ["127.0.0.1"]
    before = token_server.token_requests
    with run_edgeproxy(tmp_path, [entry]) as mirror:
        digest = copy(mirror, f"{small.repo}:v1", tmp_path / "pulled", "--src-no-creds")
        assert digest == small.image.manifest_digest  # anonymous tokens may pull here
        log = mirror.log()
    users = {request.user for request in token_server.requests[before:]}
    assert users == ({registry.username} if allowed else {None})
    assert registry.password is not None and registry.password not in log
    assert ("may not receive its credentials" in log) is not allowed


def test_login_through_the_tls_edge_with_two_workers(
    registry_none: Registry, pushed: dict[str, Pushed], tmp_path: Path
) -> None:
    """The realm is the edge's https URL, and a token one worker issued is good in the other."""
    small = pushed["small"]
    certificate, key = make_certificate(tmp_path / "certs", "127.0.0.1")
    certs = str(ca_dir(certificate, tmp_path / "ca"))
    port = free_port()
    config = {
        "mirror": {
            "root": str(tmp_path / "cache"),
            "upstream": [upstream_entry(registry_none)],
            "auth": auth_section(tmp_path),
        },
        "edge": {
            "https": f"127.0.0.1:{port}",
            "http": f"127.0.0.1:{free_port()}",
            "tls": {"certificate": str(certificate), "key": str(key)},
            "access_log": str(tmp_path / "access.log"),
            "workers": 2,
        },
    }
    edge = EdgeproxyProcess(write_toml(tmp_path / "proxy.toml", config), port)
    edge.start()
    try:
        url = f"https://127.0.0.1:{port}"
        trust = ssl.create_default_context(cafile=str(certificate))
        challenge = httpx.get(f"{url}/v2/", verify=trust)
        assert challenge.headers["www-authenticate"].startswith(f'Bearer realm="{url}/token"')
        for _ in range(10):  # a new connection each time: both workers answer some
            token = httpx.get(f"{url}/token", auth=(USER, PASSWORD), verify=trust).json()["token"]
            answer = httpx.get(
                f"{url}/v2/", headers={"Authorization": f"Bearer {token}"}, verify=trust
            )
            assert answer.status_code == 200
        # containerd's OAuth2 form: the seed's log has $request_body, but not this password.
        form = {"grant_type": "password", "username": USER, "password": PASSWORD}
        posted = httpx.post(f"{url}/token", data=form, verify=trust)
        assert posted.status_code == 200
        authfile = str(tmp_path / "auth.json")
        skopeo("login", "--cert-dir", certs, "--authfile", authfile, "-u", USER, "-p", PASSWORD,
               f"127.0.0.1:{port}")  # fmt: skip
        skopeo(
            "copy", "--src-cert-dir", certs, "--src-authfile", authfile,
            f"docker://127.0.0.1:{port}/{small.repo}:v1", f"oci:{tmp_path / 'pulled'}:v1",
        )  # fmt: skip
        index = json.loads((tmp_path / "pulled/index.json").read_text())
        assert index["manifests"][0]["digest"] == small.image.manifest_digest
    finally:
        edge.stop()
    assert PASSWORD not in edge.log()
    access_log = (tmp_path / "access.log").read_text()
    assert f"grant_type=password&username={USER}&password=***" in access_log
    assert PASSWORD not in access_log


def test_docker_login_and_pull_through_the_tls_edge(
    registry_none: Registry,
    pushed: dict[str, Pushed],
    tmp_path: Path,
    start_dockerd: Callable[..., Dockerd],
) -> None:
    """The seed's deployment with [mirror.auth]: `docker login HOST:443` asks the https realm
    (offline_token=true), `docker pull HOST:443/...` pulls with its tokens; neither the
    password nor a token reaches the access log or the error log."""
    small = pushed["small"]
    with run_edge(
        tmp_path / "edge", [upstream_entry(registry_none)], auth=auth_section(tmp_path)
    ) as edge:
        host = f"127.0.0.1:{edge.https_port}"
        daemon = start_dockerd()  # a registry on 127.0.0.0/8: https tried first, unverified
        wrong = daemon.docker("login", "--username", USER, "--password", "nope", host)
        assert "unauthorized: incorrect username or password" in wrong.stderr, wrong.stderr
        login = daemon.docker("login", "--username", USER, "--password", PASSWORD, host)
        assert login.returncode == 0, login.stderr
        pulled = daemon.docker("pull", f"{host}/{small.repo}:v1")
        assert pulled.returncode == 0, pulled.stderr + daemon.log()[-3000:]
        digests = daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}",
                                f"{host}/{small.repo}:v1")  # fmt: skip
        assert small.image.manifest_digest in digests.stdout
        lines = edge.access_lines()
        error_log = edge.process.log()
    token_lines = [line for line in lines if "/token?" in line]
    assert any("offline_token=true" in line and " 200 " in line for line in token_lines)
    assert all(" TLSv1.3 " in line for line in lines), lines
    for log in ("\n".join(lines), error_log):
        assert PASSWORD not in log and "nope" not in log and "Bearer ey" not in log


def test_containerd_pulls_with_credentials(
    registry_none: Registry, pushed: dict[str, Pushed], tmp_path: Path
) -> None:
    """containerd POSTs its password to the realm (OAuth2 password grant); without one, 401."""
    small = pushed["small"]
    with (
        run_edgeproxy(
            tmp_path / "mirror", [upstream_entry(registry_none)], auth=auth_section(tmp_path)
        ) as mirror,
        run_containerd() as socket,
    ):
        hosts = tmp_path / "hosts" / "docker.io"
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(
            'server = "https://registry-1.docker.io"\n'
            f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n'
        )

        def ctr_pull(*user: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["ctr", "--address", str(socket), "images", "pull", *user,
                 "--hosts-dir", str(tmp_path / "hosts"), f"docker.io/{small.repo}:v1"],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip

        anonymous = ctr_pull()
        assert anonymous.returncode != 0
        assert "401 Unauthorized" in anonymous.stderr, anonymous.stderr
        wrong = ctr_pull("--user", f"{USER}:nope")
        assert wrong.returncode != 0
        pulled = ctr_pull("--user", f"{USER}:{PASSWORD}")
        assert pulled.returncode == 0, pulled.stderr + pulled.stdout
        log = mirror.log()
    assert '"POST /token HTTP/1.1" 200' in log
    assert PASSWORD not in log

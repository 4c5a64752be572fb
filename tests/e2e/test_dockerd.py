"""dockerd (Debian's docker.io, 20.10) pulls through edgeproxy from the real registry: as a
`--registry-mirror` of Docker Hub, and from the mirror's own host name after `docker login`."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.support.dockerd import Dockerd
from tests.support.edge import run_edge
from tests.support.htpasswd import htpasswd_entry
from tests.support.images import (
    Image,
    build_image,
    build_index,
    files_layer,
    push,
    random_layer,
    shell_layer,
)
from tests.support.registry import Registry
from tests.support.servers import EdgeproxyProcess, run_edgeproxy

pytestmark = pytest.mark.e2e

USER, PASSWORD = "docker-puller", "dockerd-pass-456"


def docker_hub(registry: Registry) -> list[dict[str, Any]]:
    """The mirror's upstreams: `registry` standing for docker.io."""
    return [{"name": "docker.io", "url": registry.url}]


def push_image(registry: Registry, tmp_path: Path, repo: str, layers: list[bytes]) -> Image:
    """Build an image of `layers` and push it to `registry` as repo:v1."""
    image = build_image(tmp_path / "image", "v1", layers)
    push(image, registry, repo, "v1")
    return image


def mirror_with_login(registry: Registry, tmp_path: Path) -> ContextManager[EdgeproxyProcess]:
    """edgeproxy (of `registry` as docker.io) with [mirror.auth]: one htpasswd user, USER."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(htpasswd_entry(USER, PASSWORD))
    auth = {"htpasswd": str(htpasswd)}
    return run_edgeproxy(tmp_path / "mirror", docker_hub(registry), auth=auth)


def pull(daemon: Dockerd, reference: str) -> None:
    pulled = daemon.docker("pull", reference)
    assert pulled.returncode == 0, f"{pulled.stderr}\ndockerd log:\n{daemon.log()[-4000:]}"


def repo_digests(daemon: Dockerd, reference: str) -> list[str]:
    inspect = daemon.docker("image", "inspect", "--format", "{{json .RepoDigests}}", reference)
    assert inspect.returncode == 0, inspect.stderr
    return list(json.loads(inspect.stdout))


def blobs_of(image: Image) -> list[str]:
    assert image.config_digest is not None
    return [image.config_digest, *image.layer_digests]


def assert_served_by_the_mirror(daemon: Dockerd) -> None:
    """dockerd tries registry-1.docker.io when a mirror fails: it never had to."""
    log = daemon.log()
    assert "Attempting next endpoint" not in log and "registry-1.docker.io" not in log, log


def test_registry_mirror_cold_then_warm(
    registry_none: Registry, tmp_path: Path, start_dockerd: Callable[..., Dockerd]
) -> None:
    """`docker pull test/dockerd:v1` goes to the mirror (no ?ns=: dockerd's mirror is Docker
    Hub's); each blob comes from the upstream once; after `docker rmi` the mirror serves it
    again from its cache."""
    layers = [random_layer(300_001, seed=44), random_layer(5_001, seed=45)]
    image = push_image(registry_none, tmp_path, "test/dockerd", layers)
    blobs = blobs_of(image)
    before = {d: registry_none.count("GET", f"/blobs/{d}") for d in blobs}
    with run_edgeproxy(tmp_path / "mirror", docker_hub(registry_none)) as mirror:
        daemon = start_dockerd("--registry-mirror", mirror.url)
        for _ in ("cold", "warm"):
            pull(daemon, "test/dockerd:v1")
            assert repo_digests(daemon, "test/dockerd:v1") == [
                f"test/dockerd@{image.manifest_digest}"
            ]
            removed = daemon.docker("rmi", "test/dockerd:v1")
            assert removed.returncode == 0, removed.stderr
        log = mirror.log().replace("%3A", ":")
    for digest in blobs:  # both pulls fetched every blob from the mirror ...
        assert log.count(f'"GET /v2/test/dockerd/blobs/{digest} HTTP/1.1" 200') == 2, log
        # ... which fetched it from the upstream once.
        expected = before[digest] + 1
        assert registry_none.wait_count("GET", f"/blobs/{digest}", expected) == expected
    assert "?ns=" not in log
    assert_served_by_the_mirror(daemon)


def test_registry_mirror_over_https_through_the_edge(
    registry_none: Registry, tmp_path: Path, start_dockerd: Callable[..., Dockerd]
) -> None:
    """The seed's deployment: dockerd's mirror is the https edge (TLS, the mirror embedded),
    and the plain-http port redirects. dockerd pulls over https; every request is in the edge's
    access log in the seed's format. (dockerd does not verify the certificate of a loopback
    registry: 127.0.0.0/8 is always on its insecure list, so certs.d cannot be tested here.)"""
    image = push_image(registry_none, tmp_path, "test/dockerd-tls", [random_layer(300_007, 48)])
    with run_edge(tmp_path / "edge", docker_hub(registry_none)) as edge:
        daemon = start_dockerd("--registry-mirror", edge.https_url)
        pull(daemon, "test/dockerd-tls:v1")
        assert repo_digests(daemon, "test/dockerd-tls:v1") == [
            f"test/dockerd-tls@{image.manifest_digest}"
        ]
        lines = edge.access_lines()
    for digest in blobs_of(image):
        [line] = [line for line in lines if f"/v2/test/dockerd-tls/blobs/{digest}" in line]
        # The seed's log_format: the request, two upstream fields, the status; the TLS session.
        assert f'"GET /v2/test/dockerd-tls/blobs/{digest} HTTP/1.1" - - 200 ' in line, line
        assert " TLSv1.3 " in line, line
        assert registry_none.wait_count("GET", f"/blobs/{digest}", 1) == 1
    assert_served_by_the_mirror(daemon)


def test_registry_mirror_pulls_an_official_image_name(
    registry_none: Registry, tmp_path: Path, start_dockerd: Callable[..., Dockerd]
) -> None:
    """`docker pull NAME:v1`, a one-part name as `docker pull alpine` is: dockerd asks the
    mirror for Docker Hub's `library/NAME`, which the mirror takes from the upstream as is."""
    image = push_image(registry_none, tmp_path, "library/dockerd-one", [random_layer(7_001, 46)])
    with run_edgeproxy(tmp_path / "mirror", docker_hub(registry_none)) as mirror:
        daemon = start_dockerd("--registry-mirror", mirror.url)
        pull(daemon, "dockerd-one:v1")
        assert repo_digests(daemon, "dockerd-one:v1") == [f"dockerd-one@{image.manifest_digest}"]
        log = mirror.log().replace("%3A", ":")
    for digest in blobs_of(image):
        assert f'"GET /v2/library/dockerd-one/blobs/{digest} HTTP/1.1" 200' in log, log
    assert_served_by_the_mirror(daemon)


def test_registry_mirror_pulls_one_platform_of_an_index(
    registry_none: Registry, tmp_path: Path, start_dockerd: Callable[..., Dockerd]
) -> None:
    """An image index: dockerd takes its own platform (linux/amd64) through the mirror, which
    fetches that platform's blobs and none of the other's."""
    index = build_index(
        tmp_path / "index", "v1", [("linux", "amd64"), ("linux", "arm64")], layer_size=4_099,
        seed=60,
    )  # fmt: skip
    push(index, registry_none, "test/dockerd-index", "v1")
    amd64, arm64 = index.children
    with run_edgeproxy(tmp_path / "mirror", docker_hub(registry_none)) as mirror:
        daemon = start_dockerd("--registry-mirror", mirror.url)
        pull(daemon, "test/dockerd-index:v1")
        assert repo_digests(daemon, "test/dockerd-index:v1") == [
            f"test/dockerd-index@{index.manifest_digest}"
        ]
        log = mirror.log().replace("%3A", ":")
    for digest in blobs_of(amd64):
        assert f'"GET /v2/test/dockerd-index/blobs/{digest} HTTP/1.1" 200' in log
    for digest in blobs_of(arm64):
        assert digest not in log
        assert registry_none.count("GET", f"/blobs/{digest}") == 0
    assert_served_by_the_mirror(daemon)


def test_docker_run_pulls_through_the_mirror_and_runs(
    registry_none: Registry, tmp_path: Path, start_dockerd: Callable[..., Dockerd]
) -> None:
    """What a user of the mirror does: `docker run` an image dockerd does not have. It pulls
    through the mirror, unpacks both layers in order (a shell, then a file that replaces one
    of the first layer's) and runs the container (runc; no network)."""
    greeting = {"/etc/greeting": b"from the first layer\n"}
    layers = [
        files_layer({**greeting, **{"/etc/motd": b"-"}}),
        shell_layer(),
        files_layer({"/etc/greeting": b"hello through edgeproxy\n"}, mode=0o644),
    ]
    image = push_image(registry_none, tmp_path, "test/dockerd-run", layers)
    with run_edgeproxy(tmp_path / "mirror", docker_hub(registry_none)) as mirror:
        daemon = start_dockerd("--registry-mirror", mirror.url)
        script = 'read line < /etc/greeting && echo "$line" && [ -f /etc/motd ] && echo motd'
        ran = daemon.docker(
            "run", "--rm", "--network", "none", "test/dockerd-run:v1", "/bin/sh", "-c", script
        )
        assert ran.returncode == 0, f"{ran.stderr}\ndockerd log:\n{daemon.log()[-4000:]}"
        assert ran.stdout == "hello through edgeproxy\nmotd\n"
        assert "Unable to find image 'test/dockerd-run:v1' locally" in ran.stderr
        log = mirror.log().replace("%3A", ":")
    for digest in blobs_of(image):
        assert f'"GET /v2/test/dockerd-run/blobs/{digest} HTTP/1.1" 200' in log, log
    assert_served_by_the_mirror(daemon)


def test_a_failing_mirror_sends_dockerd_to_docker_hub(
    registry_none: Registry, tmp_path: Path, start_dockerd: Callable[..., Dockerd]
) -> None:
    """What the tests above rule out: on an error from its mirror (here 404 for an unknown
    tag) dockerd tries registry-1.docker.io, and reports that error, not the mirror's."""
    with run_edgeproxy(tmp_path / "mirror", docker_hub(registry_none)) as mirror:
        daemon = start_dockerd("--registry-mirror", mirror.url)
        missing = daemon.docker("pull", "test/dockerd-missing:v1")
        log = mirror.log()
    assert missing.returncode != 0
    assert '"HEAD /v2/test/dockerd-missing/manifests/v1 HTTP/1.1" 404' in log
    mirrors_error = "manifest unknown: not found at upstream docker.io"
    assert f"Attempting next endpoint for pull after error: {mirrors_error}" in daemon.log()
    assert mirrors_error not in missing.stderr  # the user sees Docker Hub's error only


def test_docker_login_and_pull_from_the_mirror_host(
    registry_none: Registry, tmp_path: Path, start_dockerd: Callable[..., Dockerd]
) -> None:
    """With [mirror.auth]: `docker login HOST` takes a token from the mirror's realm (a wrong
    password is refused with a clear message); `docker pull HOST/test/...` then pulls."""
    layer = random_layer(20_001, seed=46)
    image = push_image(registry_none, tmp_path, "test/dockerd-auth", [layer])
    with mirror_with_login(registry_none, tmp_path) as mirror:
        # 127.0.0.0/8 is insecure (plain http allowed) by default; any other host needs this.
        daemon = start_dockerd("--insecure-registry", mirror.host)
        reference = f"{mirror.host}/test/dockerd-auth:v1"
        anonymous = daemon.docker("pull", reference)
        assert anonymous.returncode != 0
        assert "unauthorized: authentication required" in anonymous.stderr, anonymous.stderr

        def login(password: str) -> subprocess.CompletedProcess[str]:
            return daemon.docker("login", "--username", USER, "--password", password, mirror.host)

        wrong = login("not-the-password")
        assert wrong.returncode != 0
        assert "unauthorized: incorrect username or password" in wrong.stderr, wrong.stderr
        ok = login(PASSWORD)
        assert ok.returncode == 0, ok.stderr
        assert "Login Succeeded" in ok.stdout
        config = json.loads((daemon.docker_config / "config.json").read_text())
        assert mirror.host in config["auths"]  # the test's own DOCKER_CONFIG
        pull(daemon, reference)
        assert repo_digests(daemon, reference) == [
            f"{mirror.host}/test/dockerd-auth@{image.manifest_digest}"
        ]
        log = mirror.log()
    assert f'"GET /token?account={USER}&client_id=docker&offline_token=true&' in log
    assert PASSWORD not in log


def test_registry_mirror_with_auth_gets_the_docker_hub_login(
    registry_none: Registry, tmp_path: Path, start_dockerd: Callable[..., Dockerd]
) -> None:
    """dockerd authenticates to a `--registry-mirror` with its Docker Hub login (the CLI's
    `https://index.docker.io/v1/` entry), nothing else. `docker login` itself would ask
    registry-1.docker.io (no internet here), so the entry is written as it would store it."""
    layer = random_layer(20_003, seed=47)
    image = push_image(registry_none, tmp_path, "test/dockerd-hub-login", [layer])
    with mirror_with_login(registry_none, tmp_path) as mirror:
        daemon = start_dockerd("--registry-mirror", mirror.url)
        anonymous = daemon.docker("pull", "test/dockerd-hub-login:v1")
        assert anonymous.returncode != 0  # the mirror's 401, then Docker Hub's answer
        assert '"HEAD /v2/test/dockerd-hub-login/manifests/v1 HTTP/1.1" 401' in mirror.log()
        hub_login = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (daemon.docker_config / "config.json").write_text(
            json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub_login}}})
        )
        pull(daemon, "test/dockerd-hub-login:v1")
        assert repo_digests(daemon, "test/dockerd-hub-login:v1") == [
            f"test/dockerd-hub-login@{image.manifest_digest}"
        ]
        log = mirror.log()
    assert f'"GET /token?account={USER}&scope=repository%3Atest%2Fdockerd-hub-login%3Apull' in log
    assert PASSWORD not in log

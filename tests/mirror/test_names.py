import pytest

from edgeproxy.config import UpstreamConfig
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.names import (
    Route,
    if_range_holds,
    names_etag,
    parse_ranges,
    parse_route,
    resolve_target,
)

DIGEST = "sha256:" + "a" * 64
HUB = UpstreamConfig(name="docker.io", url="https://registry-1.docker.io")
GHCR = UpstreamConfig(name="ghcr.io", url="https://ghcr.io")


def test_routes() -> None:
    assert parse_route("/v2/") == Route("base")
    assert parse_route("/v2/_catalog") == Route("catalog")
    assert parse_route("/v2/library/alpine/manifests/3.19") == Route(
        "manifests", "library/alpine", "3.19"
    )
    assert parse_route(f"/v2/a/b/c/blobs/{DIGEST}") == Route("blobs", "a/b/c", DIGEST)
    assert parse_route("/v2/x/tags/list") == Route("tags", "x")
    assert parse_route(f"/v2/x/referrers/{DIGEST}") == Route("referrers", "x", DIGEST)
    # A repository may itself be called "manifests": the last one is the route's.
    assert parse_route("/v2/manifests/manifests/latest") == Route(
        "manifests", "manifests", "latest"
    )
    # sha384 and sha512 pass, as registry:2 takes them (MirrorApp: unknown content).
    sha512 = "sha512:" + "a" * 128
    assert parse_route(f"/v2/x/blobs/{sha512}") == Route("blobs", "x", sha512)
    assert parse_route(f"/v2/x/manifests/{sha512}") == Route("manifests", "x", sha512)
    assert parse_route("/v2/x/blobs/uploads/") is None
    assert parse_route("/other") is None


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/../etc/manifests/latest", "NAME_INVALID"),
        ("/v2/Upper/manifests/latest", "NAME_INVALID"),
        ("/v2/a//b/manifests/latest", "NAME_INVALID"),
        ("/v2/a\x00b/manifests/latest", "NAME_INVALID"),
        ("/v2/a/manifests/.hidden", "TAG_INVALID"),
        ("/v2/a/blobs/sha256:zz", "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:" + "a" * 32, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha512:" + "a" * 127, "DIGEST_INVALID"),
        ("/v2/a/manifests/sha256:" + "A" * 64, "DIGEST_INVALID"),
    ],
)
def test_bad_paths(path: str, code: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_route(path)
    assert caught.value.code == code
    assert caught.value.status == 400


def test_upstream_selection() -> None:
    upstreams = [HUB, GHCR]
    default = resolve_target("alpine", None, upstreams)
    assert (default.upstream, default.remote_name, default.local_name) == (
        HUB,
        "library/alpine",
        "library/alpine",
    )
    by_ns = resolve_target("owner/app", "ghcr.io", upstreams)
    assert (by_ns.upstream, by_ns.remote_name, by_ns.local_name) == (
        GHCR,
        "owner/app",
        "ghcr.io/owner/app",
    )
    by_prefix = resolve_target("ghcr.io/owner/app", None, upstreams)
    assert by_prefix == by_ns
    assert resolve_target("x", "docker.io", upstreams).remote_name == "library/x"
    with pytest.raises(RegistryError) as caught:
        resolve_target("x", "evil.example.com", upstreams)
    assert caught.value.status == 404


def test_the_name_limit_is_the_upstreams() -> None:
    """255 characters (the distribution spec's limit) as the upstream is asked: Docker Hub's
    `library/` counts, an upstream's prefix does not."""
    upstreams = [HUB, GHCR]
    for name, namespace, fits in [
        ("a" * 247, None, True),  # library/ + 247 = 255
        ("a" * 248, None, False),
        ("team/" + "a" * 250, None, True),
        ("team/" + "a" * 251, None, False),
        ("ghcr.io/" + "a" * 255, None, True),  # ghcr.io is asked for the 255 only
        ("ghcr.io/" + "a" * 256, None, False),
        ("a" * 255, "ghcr.io", True),
        ("a" * 256, "ghcr.io", False),
    ]:
        if fits:
            assert len(resolve_target(name, namespace, upstreams).remote_name) == 255
            continue
        with pytest.raises(RegistryError) as caught:
            resolve_target(name, namespace, upstreams)
        assert (caught.value.code, caught.value.status) == ("NAME_INVALID", 400), name


def test_ns_names_a_host_in_any_case_and_an_empty_one_none() -> None:
    """containerd passes the image reference's host as written; registry:2 ignores `ns`."""
    upstreams = [HUB, GHCR]
    assert resolve_target("owner/app", "GHCR.io", upstreams).upstream == GHCR
    assert resolve_target("alpine", "Docker.IO", upstreams).remote_name == "library/alpine"
    assert resolve_target("ghcr.io/owner/app", "", upstreams).upstream == GHCR
    assert resolve_target("alpine", "", upstreams).local_name == "library/alpine"
    with pytest.raises(RegistryError):  # the Kelvin sign lowercases to "k"
        resolve_target(
            "x",
            "\u212aey.example",
            [HUB, UpstreamConfig(name="key.example", url="https://key.example")],
        )


@pytest.mark.parametrize(
    ("name", "namespace"),
    [("ghcr.io/owner/app", "docker.io"), ("docker.io/ghcr.io/owner/app", None)],
)
def test_the_default_upstream_never_reaches_another_upstreams_cache(
    name: str, namespace: str | None
) -> None:
    """Its cache names carry no prefix: `ghcr.io/owner/app` there is ghcr.io's `owner/app`."""
    with pytest.raises(RegistryError) as caught:
        resolve_target(name, namespace, [HUB, GHCR])
    assert caught.value.code == "NAME_UNKNOWN"
    assert resolve_target("docker.io/owner/app", "docker.io", [HUB, GHCR]).local_name == (
        "docker.io/owner/app"
    )


def test_an_upstream_with_a_port_is_cached_as_host_port() -> None:
    """registry:2's storage takes no ":" in a path: `Registry.Local:5000` is cached under
    `registry.local_5000/`, a name clients may use too, and the default upstream's own."""
    private = UpstreamConfig(name="Registry.Local:5000", url="https://registry.local:5000")
    upstreams = [HUB, private]
    by_ns = resolve_target("team/tool", "Registry.Local:5000", upstreams)
    assert (by_ns.upstream, by_ns.local_name) == (private, "registry.local_5000/team/tool")
    assert resolve_target("registry.local_5000/team/tool", None, upstreams) == by_ns
    with pytest.raises(RegistryError) as caught:
        resolve_target("registry.local_5000/team/tool", "docker.io", upstreams)
    assert caught.value.code == "NAME_UNKNOWN"


def test_ranges() -> None:
    assert parse_ranges(None, 100) == []
    assert parse_ranges("bytes=10-19", 100) == [(10, 20)]
    assert parse_ranges("bytes=90-", 100) == [(90, 100)]
    assert parse_ranges("bytes=90-1000", 100) == [(90, 100)]
    assert parse_ranges("bytes=0-" + "9" * 30, 100) == [(0, 100)]
    assert parse_ranges("bytes=-10", 100) == [(90, 100)]
    assert parse_ranges("bytes=-1000", 100) == [(0, 100)]
    assert parse_ranges("bytes= 0-1 ,\t5 - 6,", 100) == [(0, 2), (5, 7)]
    assert parse_ranges("bytes=0-1,200-,5-6", 100) == [(0, 2), (5, 7)]  # no overlap: dropped
    assert parse_ranges("bytes=-0,5-6", 100) == [(5, 7)]
    assert parse_ranges("bytes=0-,0-", 100) == []  # more than the body: ignored, as Go does
    assert parse_ranges("items=0-1", 100) == []  # RFC 9110: an unknown unit is ignored
    assert parse_ranges("bytes=", 100) == parse_ranges("bytes=,", 100) == []
    for invalid in ("bytes=20-10", "bytes=abc", "bytes=-", "bytes=1-2-3", "bytes=+1-2"):
        with pytest.raises(RegistryError) as caught:
            parse_ranges(invalid, 100)
        assert caught.value.status == 416
        assert "Content-Range" not in caught.value.headers
    for unsatisfiable in ("bytes=100-", "bytes=-0", "bytes=100-,200-"):
        with pytest.raises(RegistryError) as caught:
            parse_ranges(unsatisfiable, 100)
        assert caught.value.status == 416
        assert caught.value.headers["Content-Range"] == "bytes */100"


def test_entity_tag_lists() -> None:
    etag = '"sha256:aa"'
    assert names_etag(['"sha256:aa"'], etag, weak=False)
    assert names_etag(['"x", "sha256:aa"'], etag, weak=False)
    assert names_etag(['"x"', ' "sha256:aa" '], etag, weak=False)  # one header per tag
    assert names_etag(["*"], etag, weak=False)
    assert names_etag(['W/"sha256:aa"'], etag, weak=True)
    assert not names_etag(['W/"sha256:aa"'], etag, weak=False)  # If-Match compares strongly
    assert not names_etag(["sha256:aa", '"sha256:ab"'], etag, weak=True)
    assert not names_etag([], etag, weak=True)


def test_if_range() -> None:
    etag = '"sha256:aa"'
    assert if_range_holds(None, etag)
    assert if_range_holds('"sha256:aa"', etag)
    assert not if_range_holds('W/"sha256:aa"', etag)
    assert not if_range_holds('"sha256:ab"', etag)
    assert not if_range_holds("Wed, 21 Oct 2015 07:28:00 GMT", etag)


def test_an_upstream_named_in_capitals_is_cached_lowercase() -> None:
    """Host names ignore case, repository names do not: `Quay.IO`'s cache folder (listed by
    `_catalog`) must be a name the mirror serves, as `Registry.Local:5000`'s is."""
    quay = UpstreamConfig(name="Quay.IO", url="https://quay.io")
    by_ns = resolve_target("team/tool", "Quay.IO", [HUB, quay])
    assert by_ns.local_name == "quay.io/team/tool"
    assert resolve_target("quay.io/team/tool", None, [HUB, quay]) == by_ns


def test_docker_hub_named_in_capitals_still_adds_library() -> None:
    hub = UpstreamConfig(name="Docker.IO", url="https://registry-1.docker.io")
    assert resolve_target("alpine", None, [hub]).remote_name == "library/alpine"

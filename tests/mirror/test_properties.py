"""Properties of every parser of outside input (hypothesis): names, references, digests,
Range, `n`, Accept, manifests' media types and upstream `WWW-Authenticate` challenges.

Each one either returns a value that is safe to use (a path under the cache root, a header
value) or raises a RegistryError with a 4xx status; never anything else.
"""

from __future__ import annotations

import json
import os.path
import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edgeproxy.config import UpstreamConfig
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.manifests import media_type_of
from edgeproxy.mirror.names import (
    MAX_NAME_LENGTH,
    check_digest,
    check_name,
    check_reference,
    parse_accept,
    parse_count,
    parse_ranges,
    parse_route,
    resolve_target,
)
from edgeproxy.mirror.storage import FilesystemStorage
from edgeproxy.mirror.upstream import parse_challenges

HUB = UpstreamConfig(name="docker.io", url="https://registry-1.docker.io")
GHCR = UpstreamConfig(name="ghcr.io", url="https://ghcr.io")

COMPONENT = st.from_regex(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", fullmatch=True)
NAMES = st.lists(COMPONENT, min_size=1, max_size=5).map("/".join)
TAGS = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True)
DIGESTS = st.from_regex(r"sha256:[a-f0-9]{64}", fullmatch=True)
# Text with the characters that make path tricks, and anything else.
TRICKY = st.text(
    st.sampled_from("./%\\\x00\r\n:_-aZ9@ ") | st.characters(codec="utf-8"), max_size=300
)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> FilesystemStorage:
    return FilesystemStorage(tmp_path_factory.mktemp("cache"))


def inside(storage: FilesystemStorage, path: Path) -> bool:
    """`path` stays under the root once `..` is resolved (lexically: it need not exist)."""
    return os.path.normpath(path).startswith(f"{storage.root}/")


def refused(call: object, *args: object) -> RegistryError | None:
    try:
        assert callable(call)
        call(*args)
    except RegistryError as exc:
        assert 400 <= exc.status < 500
        return exc
    return None


@given(NAMES)
def test_valid_names_are_accepted(name: str) -> None:
    assert check_name(name) == name  # its length is the upstream's name's (test_names.py)


@given(TRICKY | NAMES)
@example("..")
@example("a/../../etc")
@example("/etc/passwd")
@example("A")
@example("a\x00")
@example("a" * 256)
def test_names_are_accepted_only_when_safe(storage: FilesystemStorage, name: str) -> None:
    error = refused(check_name, name)
    if error is not None:
        assert error.code == "NAME_INVALID"
        return
    assert re.fullmatch(r"[a-z0-9._/-]+", name)
    assert ".." not in name.split("/") and "" not in name.split("/")
    repo = storage._repo(name)
    assert inside(storage, repo / "_manifests" / "tags" / "latest")


@given(TAGS | DIGESTS | TRICKY)
@example("..")
@example(".")
@example("a:b")
def test_references_are_tags_or_sha256_digests(storage: FilesystemStorage, reference: str) -> None:
    error = refused(check_reference, reference)
    if error is not None:
        assert error.code in ("TAG_INVALID", "DIGEST_INVALID")
        return
    if ":" in reference:
        assert re.fullmatch(r"sha256:[a-f0-9]{64}", reference)
    else:
        assert re.fullmatch(r"\w[\w.-]{0,127}", reference, re.ASCII)
        assert reference not in (".", "..")
        tag_folder = storage._repo("x") / "_manifests" / "tags" / reference
        assert inside(storage, tag_folder) and tag_folder.name == reference


OTHER_DIGESTS = st.from_regex(r"(sha512|md5|sha256):[a-zA-Z0-9=_-]{1,130}", fullmatch=True)


@given(DIGESTS | TRICKY | OTHER_DIGESTS)
def test_digests_are_sha256_only_and_map_inside_the_root(
    storage: FilesystemStorage, digest: str
) -> None:
    error = refused(check_digest, digest)
    if error is not None:
        assert error.code == "DIGEST_INVALID" and error.status == 400
        return
    assert re.fullmatch(r"sha256:[a-f0-9]{64}", digest)
    assert inside(storage, storage.blob_path(digest))
    assert storage.fill_path(digest, "partial").parent == storage.root / "edgeproxy" / "fills"


@given(st.text(max_size=400) | st.lists(TRICKY, max_size=6).map(lambda p: "/v2/" + "/".join(p)))
@example("/v2/../../etc/passwd/manifests/latest")
@example("/v2/a\nb/tags/list")
def test_routes_never_raise_anything_else(path: str) -> None:
    try:
        route = parse_route(path)
    except RegistryError as exc:
        assert exc.status == 400
        return
    if route is not None and route.name:
        assert check_name(route.name) == route.name


@given(
    NAMES,
    st.none() | st.sampled_from(["docker.io", "ghcr.io"]) | st.text(max_size=20),
)
def test_targets(storage: FilesystemStorage, name: str, namespace: str | None) -> None:
    upstreams = [HUB, GHCR]
    error = refused(resolve_target, name, namespace, upstreams)
    if error is not None and error.code == "NAME_INVALID":  # over 255 with `library/`
        assert len(f"library/{name}") > MAX_NAME_LENGTH
        return
    if error is not None:
        assert error.code == "NAME_UNKNOWN"
        assert namespace not in ("docker.io", "ghcr.io", None)
        return
    target = resolve_target(name, namespace, upstreams)
    assert len(target.remote_name) <= MAX_NAME_LENGTH
    assert target.upstream in upstreams
    assert target.local_name.endswith(target.remote_name)
    if target.upstream is HUB:
        assert target.local_name == target.remote_name and "/" in target.remote_name
    else:
        assert target.local_name == f"ghcr.io/{target.remote_name}"
    assert inside(storage, storage._repo(target.local_name))


UPSTREAMS = [
    HUB,
    GHCR,
    UpstreamConfig(name="Quay.IO", url="https://quay.io"),
    UpstreamConfig(name="Registry.Local:5000", url="https://registry.local:5000"),
]
CACHE_NAME = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)


@given(
    st.sampled_from(["", *(f"{u.cache_prefix}/" for u in UPSTREAMS)]),
    NAMES,
    st.none() | st.sampled_from([u.name for u in UPSTREAMS]),
)
def test_cache_names_lead_back_to_their_upstream_alone(
    prefix: str, name: str, namespace: str | None
) -> None:
    """A cache name is a repository name (`_catalog` lists it, clients pull by it) in its
    upstream's folder alone, and asking by it reaches the same upstream and repository."""
    if (error := refused(resolve_target, prefix + name, namespace, UPSTREAMS)) is not None:
        # Over 255 as the upstream is asked: the whole name (another upstream's prefix is part
        # of a name `ns` sends elsewhere), `library/` perhaps added.
        too_long = len(f"library/{prefix}{name}") > MAX_NAME_LENGTH
        assert error.code == "NAME_UNKNOWN" or (error.code == "NAME_INVALID" and too_long)
        return
    target = resolve_target(prefix + name, namespace, UPSTREAMS)
    assert CACHE_NAME.fullmatch(target.local_name)
    first = target.local_name.partition("/")[0]
    assert first not in {u.cache_prefix for u in UPSTREAMS if u is not target.upstream}
    if target.upstream is not HUB:
        assert first == target.upstream.cache_prefix
    if first != HUB.cache_prefix:  # `docker.io/x` asked by that name is Docker Hub's `x`
        assert resolve_target(target.local_name, None, UPSTREAMS) == target


RANGE_NUMBERS = st.integers(0, 10**6).map(str) | st.text("0123456789", max_size=30)
RANGES = st.builds(
    lambda unit, first, last, tail: f"{unit}={first}-{last}{tail}",
    st.sampled_from(["bytes", "BYTES", " bytes", "lines", ""]),
    st.just("") | RANGE_NUMBERS,
    st.just("") | RANGE_NUMBERS,
    st.sampled_from(["", " ", ",0-1", "-", "x"]),
)


@given(st.none() | RANGES | st.text(max_size=60), st.integers(0, 10**7))
@example("bytes=0-", 0)
@example("bytes=-0", 10)
@example("bytes=" + "9" * 5000 + "-", 10)
def test_ranges(header: str | None, size: int) -> None:
    try:
        spans = parse_ranges(header, size)
    except RegistryError as exc:
        assert (exc.status, exc.code) == (416, "RANGE_INVALID")
        assert exc.headers in ({"Content-Range": f"bytes */{size}"}, {})
        return
    assert all(0 <= start < end <= size for start, end in spans)
    assert sum(end - start for start, end in spans) <= size


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 10**6))
def test_ranges_agree_with_rfc_9110(first: int, last: int, size: int) -> None:
    header = f"bytes={first}-{last}"
    if last < first or first >= size:
        assert refused(parse_ranges, header, size) is not None
    else:
        assert parse_ranges(header, size) == [(first, min(last, size - 1) + 1)]
    if last:
        assert parse_ranges(f"bytes=-{last}", size) == [(max(0, size - last), size)]


@given(st.text(max_size=40))
def test_counts(value: str) -> None:
    error = refused(parse_count, value)
    if error is None:
        assert value.isascii() and value.isdigit() and parse_count(value) >= 0
    else:
        assert error.code == "PAGINATION_NUMBER_INVALID"


@given(st.lists(st.text(max_size=60), max_size=4))
def test_accept_is_safe_to_pass_on(values: list[str]) -> None:
    accept = parse_accept(values)
    if accept is not None:
        accept.encode("ascii")
        assert accept.isprintable() and "\r" not in accept and "\n" not in accept


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


@given(
    st.binary(max_size=200)
    | st.builds(
        lambda media_type, extra: (
            '{"mediaType": ' + json.dumps(media_type) + extra + "}"
        ).encode(),
        st.text(max_size=40) | st.sampled_from(["application/vnd.oci.image.index.v1+json"]),
        st.sampled_from(["", ', "schemaVersion": 2', ', "manifests": []']),
    )
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
)
@example(b"[" * 100_000)
@example(b'{"mediaType": "a/b\\r\\nX: y"}')
def test_manifest_media_types_are_header_safe(data: bytes) -> None:
    error = refused(media_type_of, data)
    if error is not None:
        assert error.code == "MANIFEST_INVALID"
        return
    media_type = media_type_of(data)
    media_type.encode("ascii")
    assert re.fullmatch(r"[A-Za-z0-9][\w!#$&^.+-]*/[A-Za-z0-9][\w!#$&^.+-]*", media_type)


PARAM_NAMES = st.sampled_from(["realm", "service", "scope", "error", "x_extra"])
PARAM_VALUES = st.text(
    st.characters(codec="latin-1", exclude_characters="\r\n") | st.sampled_from('"\\,= '),
    max_size=40,
)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(
    st.sampled_from(["Bearer", "bearer", "Basic", "BASIC"]),
    st.dictionaries(PARAM_NAMES, PARAM_VALUES, max_size=4),
    st.sampled_from([",", ", ", " ,  "]),
)
@example("Bearer", {"realm": 'a\\"b', "service": "x,y"}, ",")
def test_challenges_round_trip(scheme: str, params: dict[str, str], separator: str) -> None:
    header = f"{scheme} " + separator.join(f"{k}={quote(v)}" for k, v in params.items())
    assert parse_challenges([header]) == [(scheme.lower(), params)]
    # Several in one header, as RFC 9110 allows, or in several headers: each its own.
    other = ("basic", {"realm": "x"})
    assert parse_challenges([f'{header}, Basic realm="x"']) == [(scheme.lower(), params), other]
    assert parse_challenges(['Basic realm="x"', header]) == [other, (scheme.lower(), params)]


@given(st.lists(st.text(max_size=200), max_size=3))
def test_challenges_never_raise(headers: list[str]) -> None:
    for scheme, params in parse_challenges(headers):
        assert scheme == scheme.lower()
        assert all(isinstance(v, str) for v in params.values())

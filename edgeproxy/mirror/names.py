"""Parsing of everything a client puts in a registry request: repository names, references,
digests, Range and conditional headers and the upstream a request is for. Pure functions;
each input is checked here once and becomes a typed value or a RegistryError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edgeproxy.config import UpstreamConfig
from edgeproxy.mirror.errors import RegistryError

# The distribution reference grammar (path components only; a registry host never appears
# in an API path).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_SHA256 = re.compile(r"sha256:[a-f0-9]{64}")
# go-digest's other algorithms: registry:2 takes them in a path (content pushed as sha512 is
# linked to its sha256 data), the cache never holds content under them.
_UNCACHED_DIGEST = re.compile(r"sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")
MAX_NAME_LENGTH = 255

# DOTALL: a name holding a CR/LF is still a name, refused as NAME_INVALID rather than 404.
_ROUTE = re.compile(
    r"/v2/(?P<name>.+)/(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)", re.DOTALL
)
_TAGS = re.compile(r"/v2/(?P<name>.+)/tags/list", re.DOTALL)
# Past any blob and any page: Python's int() refuses strings over 4300 digits.
_HUGE = 10**20
# One byte-range-spec, spaces around its numbers allowed (Go trims them).
_RANGE_SPEC = re.compile(r"([0-9]*)[ \t]*-[ \t]*([0-9]*)")

Kind = Literal["base", "catalog", "manifests", "blobs", "tags", "referrers"]


@dataclass(frozen=True)
class Route:
    """What a /v2/ path asks for; `name` and `reference` are validated."""

    kind: Kind
    name: str = ""
    reference: str = ""


@dataclass(frozen=True)
class Target:
    """A repository as the upstream knows it and as the cache stores it."""

    upstream: UpstreamConfig
    remote_name: str
    local_name: str


def parse_route(path: str) -> Route | None:
    """The route for a decoded request path, None when it is not a registry API path."""
    if path == "/v2/":
        return Route("base")
    if path == "/v2/_catalog":
        return Route("catalog")
    if match := _TAGS.fullmatch(path):
        return Route("tags", check_name(match["name"]))
    if match := _ROUTE.fullmatch(path):
        name, kind, ref = check_name(match["name"]), match["kind"], match["ref"]
        # A sha384 or sha512 digest passes, as registry:2 takes it: the app answers it unknown
        # (the upstream, for a referrers query).
        if not is_uncached_digest(ref):
            ref = check_reference(ref) if kind == "manifests" else check_digest(ref)
        if kind == "manifests":
            return Route("manifests", name, ref)
        return Route("blobs" if kind == "blobs" else "referrers", name, ref)
    return None


def slash_moved(path: str) -> str | None:
    """Where registry:2's router (gorilla/mux, strict slash) moves a path that names a route
    but for its last slash: `/v2` to `/v2/`, `/v2/<name>/tags/list/` to the path without it.
    None for every other path."""
    if path == "/v2":
        return "/v2/"
    if not path.endswith("/") or path == "/v2/":
        return None
    try:
        route = parse_route(path[:-1])
    except RegistryError:  # its routes match only valid names and references: a 404 there
        return None
    return path[:-1] if route is not None and route.kind != "base" else None


def check_name(name: str) -> str:
    """A name of the reference grammar; its length is checked as the upstream names it
    (`resolve_target`)."""
    if not _NAME.fullmatch(name):
        raise RegistryError(
            "NAME_INVALID", "invalid repository name", {"name": name[:MAX_NAME_LENGTH]}
        )
    return name


def check_reference(reference: str) -> str:
    """A tag or a digest."""
    if ":" in reference:
        return check_digest(reference)
    if not _TAG.fullmatch(reference):
        raise RegistryError("TAG_INVALID", "invalid tag", {"tag": reference[:128]})
    return reference


def check_digest(digest: str) -> str:
    """A sha256 digest: the only algorithm registry:2's filesystem layout stores."""
    if _SHA256.fullmatch(digest):
        return digest
    reason = "unsupported digest algorithm" if _DIGEST.fullmatch(digest) else "invalid digest"
    raise RegistryError("DIGEST_INVALID", reason, {"digest": digest[:160]})


def is_digest(reference: str) -> bool:
    return ":" in reference


def is_uncached_digest(reference: str) -> bool:
    """A well-formed sha384 or sha512 digest: one registry:2 takes, the cache never holds."""
    return _UNCACHED_DIGEST.fullmatch(reference) is not None


def upstream_named(namespace: str | None, upstreams: list[UpstreamConfig]) -> UpstreamConfig | None:
    """The upstream a client's `?ns=` names: a registry's host, in any case, as DNS reads it
    (config refuses upstream names that differ only in case). ASCII only: str.lower() maps
    some other letters to ASCII ones (the Kelvin sign to k)."""
    if not namespace or not namespace.isascii():
        return None
    return next((u for u in upstreams if u.name.lower() == namespace.lower()), None)


def resolve_target(name: str, namespace: str | None, upstreams: list[UpstreamConfig]) -> Target:
    """Pick the upstream for `name`: containerd's `?ns=`, a leading upstream name (as the
    cache names it: `host_port` for `host:port`), or the default (first) upstream. `ns` is
    only ever a lookup key, never a host to connect to."""
    by_prefix = {u.cache_prefix: u for u in upstreams}  # a path's first component has no ":"
    if namespace:
        named = upstream_named(namespace, upstreams)
        if named is None:
            raise RegistryError(
                "NAME_UNKNOWN",
                "no upstream is configured for this registry",
                {"ns": namespace[:255]},
            )
        upstream, remote = named, name
    else:
        first, _, rest = name.partition("/")
        if rest and first in by_prefix:
            upstream, remote = by_prefix[first], rest
        else:
            upstream, remote = upstreams[0], name
    if upstream.adds_library_prefix and "/" not in remote:
        remote = f"library/{remote}"
    if len(remote) > MAX_NAME_LENGTH:
        # The distribution spec's limit, on the name the upstream is asked for: `library/`
        # counts (the upstream would refuse the name), an upstream's prefix does not (the
        # upstream never sees it).
        raise RegistryError(
            "NAME_INVALID",
            f"repository name over {MAX_NAME_LENGTH} characters upstream",
            {"name": name[:MAX_NAME_LENGTH]},
        )
    if upstream is not upstreams[0]:
        return Target(upstream, remote, f"{upstream.cache_prefix}/{remote}")
    if by_prefix.get(remote.partition("/")[0], upstream) is not upstream:
        # `?ns=<default>` (or `<default>/` before it) with `<other upstream>/repo`: its cache
        # name would be the other upstream's, whose content and access rules it must not reach.
        raise RegistryError(
            "NAME_UNKNOWN", "the name starts with another upstream's name", {"name": name[:255]}
        )
    return Target(upstream, remote, remote)


def parse_ranges(header: str | None, size: int) -> list[tuple[int, int]]:
    """The (start, end exclusive) spans of a Range header, as Go's http.ServeContent (the
    registry's blob server) reads them; an empty list sends the whole body.

    A malformed range is RANGE_INVALID (416), as is a set where none overlaps the body (with
    `Content-Range: bytes */size`); a span that does not overlap is dropped, and spans that add
    up to more than the body are ignored. Where Go departs from RFC 9110, the RFC wins: another
    range unit is ignored (200, not 416), `-0` is unsatisfiable (Go sends a 206 with an
    impossible Content-Range), and a number past any body means "to the end".
    """
    if not header:
        return []
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes":
        return []
    spans = []
    for spec in specs.split(","):
        spec = spec.strip(" \t")
        if not spec:
            continue
        match = _RANGE_SPEC.fullmatch(spec)
        if match is None or match.group(1, 2) == ("", ""):
            raise _invalid_range(spec)
        first, last = match.group(1, 2)
        if not first:  # a suffix range: the last N bytes; zero of them is none at all
            if _number(last) and size:
                spans.append((max(0, size - _number(last)), size))
            continue
        start = _number(first)
        if last and _number(last) < start:
            raise _invalid_range(spec)
        if start < size:
            spans.append((start, min(_number(last) + 1, size) if last else size))
    if not spans and specs.strip(" \t,"):
        raise _unsatisfiable(size)
    if sum(end - start for start, end in spans) > size:  # Go: "probably an attack"
        return []
    return spans


def names_etag(values: list[str], etag: str, weak: bool, star: bool = True) -> bool:
    """Whether If-Match or If-None-Match `values` name the entity tag `etag` (quoted) or are
    `*` (unless not `star`): weak comparison (W/"x" names "x") for If-None-Match, strong for
    If-Match (RFC 9110)."""
    for value in values:
        for tag in value.split(","):  # our tags hold no comma
            tag = tag.strip()
            if weak and tag.startswith("W/"):
                tag = tag[2:]
            if tag == etag or (star and tag == "*"):
                return True
    return False


def if_range_holds(value: str | None, etag: str) -> bool:
    """Whether a Range applies under If-Range `value`: absent, or the same strong entity tag.
    A date never holds: blobs carry no Last-Modified (registry:2 serves them with none)."""
    return value is None or value.strip() == etag


def parse_count(value: str) -> int:
    """The `n` of a paginated list: ASCII digits only (`"²".isdigit()` is true)."""
    if not (value.isascii() and value.isdigit()):
        raise RegistryError("PAGINATION_NUMBER_INVALID", "n must be a number", {"n": value[:32]})
    return _number(value)


def parse_accept(values: list[str]) -> str | None:
    """The client's Accept headers as one list (skopeo sends one header per type), without
    the items that cannot be passed on to an upstream (non-ASCII, control characters)."""
    kinds = [kind.strip() for value in values for kind in value.split(",")]
    return ", ".join(k for k in kinds if k and k.isascii() and k.isprintable()) or None


def _number(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) < 20 else _HUGE


def _invalid_range(spec: str) -> RegistryError:
    return RegistryError("RANGE_INVALID", "invalid range", {"range": spec[:64]})


def _unsatisfiable(size: int) -> RegistryError:
    return RegistryError(
        "RANGE_INVALID",
        "requested range not satisfiable",
        status=416,
        headers={"Content-Range": f"bytes */{size}"},
    )

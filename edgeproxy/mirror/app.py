"""The mirror's ASGI app: the pull side of the registry API, routed to the services."""

from __future__ import annotations

import functools
import html
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import unquote, unquote_plus, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from edgeproxy.config import MirrorConfig
from edgeproxy.mirror.auth import TOKEN_PATH, Authenticator
from edgeproxy.mirror.blobs import BlobService
from edgeproxy.mirror.byteranges import Byteranges, Read
from edgeproxy.mirror.cache_status import HIT, MISS, REVALIDATED, STALE, forwarded
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.eviction import Evictor
from edgeproxy.mirror.manifests import OCI_INDEX, ManifestService
from edgeproxy.mirror.names import (
    Route,
    Target,
    check_reference,
    if_range_holds,
    is_uncached_digest,
    names_etag,
    parse_accept,
    parse_count,
    parse_ranges,
    parse_route,
    resolve_target,
    slash_moved,
    upstream_named,
)
from edgeproxy.mirror.pulls import PullRecorder
from edgeproxy.mirror.storage import FilesystemStorage, Storage
from edgeproxy.mirror.upstream import UpstreamClient, UpstreamResponse, UpstreamUnavailable

log = logging.getLogger("edgeproxy.mirror")

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
ALLOW = {"Allow": "GET, HEAD"}
LIST_ALLOW = {"Allow": "GET"}  # tags/list and _catalog: registry:2 routes only GET there
CATALOG_PAGES = (100, 1000)  # registry:2's page without `n`, and its catalog.maxentries
BLOB_CACHE_CONTROL = "max-age=31536000"
# RFC 8288: rel="next", or rel=next, or next among several relation types.
_LINK_REL = re.compile(r';\s*rel\s*=\s*(?:"[^"]*\bnext\b[^"]*"|next\b)', re.IGNORECASE)
# An upstream without the referrers API answers 404 (as the OCI spec asks), or 405 or 400
# (a router that knows no such path): the mirror reads the OCI 1.1 tag schema instead.
NO_REFERRERS_API = (400, 404, 405)


class MirrorApp:
    """A pull-through cache of the upstreams in `config`, as an ASGI application."""

    def __init__(
        self, config: MirrorConfig, storage: Storage | None = None, workers: int = 1
    ) -> None:
        """`workers`: the processes serving this cache (each one's evictor asks for a pass at
        its share of the room under `max_size`)."""
        self.config = config
        self.storage = storage or FilesystemStorage(config.root)
        self.evictor = Evictor(config.cache, self.storage, config.root / "edgeproxy", workers)
        self.manifests = ManifestService(self.storage, self.evictor)
        self.blobs = BlobService(self.storage, self.evictor)
        self.pulls = PullRecorder(self.storage)
        self.upstreams = {u.name: UpstreamClient(u) for u in config.upstream}
        self.auth = Authenticator(config.auth, config.root) if config.auth else None
        self._headers = [API_VERSION, *config.headers.items()]

    def start(self) -> None:
        """Start the background work of a serving process: the cache's eviction."""
        self.evictor.start()

    async def aclose(self) -> None:
        await self.evictor.aclose()
        await self.blobs.aclose()
        for upstream in self.upstreams.values():
            await upstream.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        head = request.method == "HEAD"
        try:
            response = await self.handle(request)
        except RegistryError as exc:
            log.info("%s %s: %s %s", request.method, scope["path"], exc.status, exc)
            response = exc.response(head)
        except Exception:
            log.exception("%s %s failed", request.method, scope["path"])
            response = RegistryError("UNKNOWN", "internal error").response(head)
        for name, value in self._headers:
            response.headers.setdefault(name, value)
        namespace = request.query_params.get("ns")
        if upstream_named(namespace, self.config.upstream) is not None:
            response.headers["OCI-Namespace"] = str(namespace)  # never echo an unknown one
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await response(scope, receive, tracking_send)
        except RegistryError as exc:  # a fill failed mid-body: cut the connection short
            if not started:
                raise
            log.warning("%s %s: body cut short: %s", request.method, scope["path"], exc)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, request: Request) -> Response:
        if request.scope["path"] == "/":  # registry:2's liveness answer, for load balancers
            return Response(headers={"Cache-Control": "no-cache"})
        moved = slash_moved(request.scope["path"])
        if moved is not None:
            return _moved(request, moved)
        if self.auth is not None and request.scope["path"] == TOKEN_PATH:
            return await self.auth.token(request)
        route = parse_route(request.scope["path"])
        allow = _allow(route)
        if allow is not None and request.method not in (*allow["Allow"].split(", "), "OPTIONS"):
            read_only = "this registry is a read-only mirror"
            message = "a list is read with GET" if request.method == "HEAD" else read_only
            raise RegistryError("UNSUPPORTED", message, headers=allow)
        if route is None:
            raise RegistryError("UNSUPPORTED", "not a registry API path", status=404)
        target = None
        if route.kind not in ("base", "catalog"):
            target = resolve_target(
                route.name, request.query_params.get("ns"), list(self.config.upstream)
            )
        if self.auth is not None:
            await self.auth.check(request, self.auth.access(route, target))
        if route.kind == "base":
            return _json({})
        if request.method == "OPTIONS":  # a CORS preflight: 200, as registry:2's handlers say
            return Response(headers=allow)
        if route.kind == "catalog" or target is None:
            names = self.storage.repositories()
            return _paginated(request, "repositories", names, "/v2/_catalog", {}, CATALOG_PAGES)
        if route.kind in ("manifests", "blobs") and is_uncached_digest(route.reference):
            # registry:2 answers 404 for what it lacks (in proxy mode, what the upstream
            # lacks); the cache stores sha256 content only, so the mirror has none of it.
            code = "MANIFEST_UNKNOWN" if route.kind == "manifests" else "BLOB_UNKNOWN"
            raise RegistryError(code, "only sha256 content is cached", {"digest": route.reference})
        upstream = self.upstreams[target.upstream.name]
        if route.kind == "manifests":
            return await self._manifest(request, route, target, upstream)
        if route.kind == "blobs":
            return await self._blob(request, route, target, upstream)
        if route.kind == "tags":
            return await self._tags(request, route, target, upstream)
        return await self._referrers(request, route, target, upstream)

    async def _manifest(
        self, request: Request, route: Route, target: Target, upstream: UpstreamClient
    ) -> Response:
        found = await self.manifests.get(upstream, target, route.reference)
        manifest = await self.manifests.negotiate(
            upstream, target, route.reference, found, _accept(request)
        )
        top, status = found
        # A list served as its linux/amd64 manifest is pulled too: eviction keeps the tag.
        for digest in {top.digest, manifest.digest}:
            self.pulls.manifest(target.local_name, digest)
        headers = {
            "Docker-Content-Digest": manifest.digest,
            "ETag": f'"{manifest.digest}"',
            "Content-Length": str(len(manifest.data)),
            "Cache-Status": status,
        }
        # `*` is not the manifest's digest: registry:2 sends the manifest, which a client that
        # has none of its own can use (a 304 would leave it nothing).
        if _not_modified(request, manifest.digest, star=False):
            return Response(status_code=304, headers=_without_content(headers))
        body = b"" if request.method == "HEAD" else manifest.data
        return Response(body, headers=headers, media_type=manifest.media_type)

    async def _blob(
        self, request: Request, route: Route, target: Target, upstream: UpstreamClient
    ) -> Response:
        digest = route.reference
        status = HIT
        if self.blobs.needs_confirming(target.local_name, digest):
            await self.blobs.confirm(upstream, target, digest)
            status = REVALIDATED
        if request.method == "HEAD":
            size = self.blobs.size(digest)
            if size is None:
                return await self._head_cold_blob(request, target, upstream, digest)
            self.pulls.blob(target.local_name, digest)
            return _blob_response(request, digest, status, size, None)
        # A warm GET holds the blob open from here on: an eviction cannot cut its body short.
        reader = self.blobs.open_stored(digest)
        if reader is not None:
            self.pulls.blob(target.local_name, digest)
            body = functools.partial(self.blobs.read_stored, reader, request.scope["scheme"])
            return _blob_response(request, digest, status, reader.size, body, reader.close)
        fill = await self.blobs.fill(upstream, target, digest)
        if fill.size is None:  # an upstream that sent no length: stream it all, chunked
            return StreamingResponse(
                self.blobs.read_fill(fill, 0, None),
                headers=_blob_headers(digest, MISS, None),
                media_type="application/octet-stream",
            )
        body_of_fill = functools.partial(self.blobs.read_fill, fill)
        return _blob_response(request, digest, MISS, fill.size, body_of_fill)

    async def _head_cold_blob(
        self, request: Request, target: Target, upstream: UpstreamClient, digest: str
    ) -> Response:
        """Answer from the upstream's HEAD: a HEAD never downloads the blob."""
        length = await self.blobs.confirm(upstream, target, digest)
        if length is None:  # the upstream did not say: neither does the mirror
            response = Response(status_code=200, headers=_blob_headers(digest, MISS, None))
            del response.headers["content-length"]  # starlette's 0 for the empty body
            return response
        return _blob_response(request, digest, MISS, length, None)

    async def _tags(
        self, request: Request, route: Route, target: Target, upstream: UpstreamClient
    ) -> Response:
        params = _upstream_params(request)
        if "n" in params:
            params["n"] = str(parse_count(params["n"]))
        path = f"/v2/{route.name}/tags/list"
        asked = f"/v2/{target.remote_name}/tags/list"
        try:
            answer = await upstream.request("GET", asked, target.remote_name, params=params)
            if answer.status != 200:
                retry_after = answer.headers.get("retry-after")
                raise upstream.error(answer.status, "NAME_UNKNOWN", retry_after, answer.body)
        except RegistryError as exc:  # down or refusing: the tags cached here, as registry:2
            tags = self.storage.list_tags(target.local_name)
            if not tags:
                raise
            log.warning("tags of %s from the cache: %s", target.local_name, exc.message)
            extra = {"name": route.name}
            response = _paginated(request, "tags", tags, path, extra, keep=_namespace(request))
            response.headers["Cache-Status"] = STALE
            return response
        headers = {"Cache-Status": MISS, **_next_page(request, upstream, answer, asked, path)}
        body = _named(answer.body, route.name)
        return Response(body, headers=headers, media_type="application/json")

    async def _referrers(
        self, request: Request, route: Route, target: Target, upstream: UpstreamClient
    ) -> Response:
        params = _upstream_params(request)
        asked = f"/v2/{target.remote_name}/referrers/{route.reference}"
        try:
            answer: UpstreamResponse | None = await upstream.request(
                "GET",
                asked,
                target.remote_name,
                headers={"Accept": OCI_INDEX},
                params=params,
            )
        except UpstreamUnavailable:
            answer = None  # down: the tag schema's index still answers if it is cached
        if answer is not None and _is_referrers_index(answer):
            path = f"/v2/{route.name}/referrers/{route.reference}"
            headers = {"Cache-Status": MISS, **_next_page(request, upstream, answer, asked, path)}
            filters = answer.headers.get("oci-filters-applied")
            if filters := upstream.passable("OCI-Filters-Applied", filters):
                headers["OCI-Filters-Applied"] = filters
            return Response(answer.body, headers=headers, media_type=OCI_INDEX)
        if answer is None or answer.status in (200, *NO_REFERRERS_API):  # its tag schema
            found, status = await self._referrers_tag(route, target, upstream)
            headers = {"Cache-Status": status if answer is None else forwarded(answer.status)}
            if "artifactType" in params:
                found = [d for d in found if d.get("artifactType") == params["artifactType"]]
                headers["OCI-Filters-Applied"] = "artifactType"
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
            return Response(json.dumps(index).encode(), headers=headers, media_type=OCI_INDEX)
        retry_after = answer.headers.get("retry-after")
        raise upstream.error(answer.status, "MANIFEST_UNKNOWN", retry_after, answer.body)

    async def _referrers_tag(
        self, route: Route, target: Target, upstream: UpstreamClient
    ) -> tuple[list[dict[str, Any]], str]:
        """The referrers an upstream without the API lists under the OCI 1.1 tag schema
        (`<alg>-<hex>`, the index clients such as notation and oras push there), and how the
        cache got them: a client that asks the mirror's API finds them too. An empty list
        when there is no such tag."""
        algorithm, _, encoded = route.reference.partition(":")
        try:
            tag = check_reference(f"{algorithm[:32]}-{encoded[:64]}")
            index, status = await self.manifests.get(upstream, target, tag)
        except RegistryError as exc:
            if exc.code in ("MANIFEST_UNKNOWN", "TAG_INVALID"):
                return [], forwarded(404)
            raise
        document = json.loads(index.data) if index.media_type == OCI_INDEX else {}
        manifests = document.get("manifests")
        found = [d for d in manifests if isinstance(d, dict)] if isinstance(manifests, list) else []
        return found, status


def _allow(route: Route | None) -> dict[str, str] | None:
    """The methods a path takes, as an Allow header; None for the base route, which registry:2
    answers whatever the method (a HEAD of a list is a 405 there: its routes name only GET)."""
    if route is not None and route.kind == "base":
        return None
    return LIST_ALLOW if route is not None and route.kind in ("tags", "catalog") else ALLOW


def _is_referrers_index(answer: UpstreamResponse) -> bool:
    """Whether an upstream's referrers answer is the API's: a 200 that says it is an OCI
    index, as oras-go takes it (a catch-all web UI answers 200 with its page)."""
    content_type = answer.headers.get("content-type", "").partition(";")[0].strip().lower()
    return answer.status == 200 and content_type == OCI_INDEX


def _blob_response(
    request: Request,
    digest: str,
    cache_status: str,
    size: int,
    body: Read | None,
    release: Callable[[], None] | None = None,
) -> Response:
    """The blob's answer, headers only when `body` is None (HEAD); `release` (an open blob's
    close) is called once the answer no longer needs `body`: after its last byte, or at once."""
    try:
        status, headers, content = _blob_answer(request, digest, cache_status, size, body)
    except BaseException:
        if release is not None:
            release()
        raise
    if content is None:
        if release is not None:
            release()
        return Response(status_code=status, headers=headers)
    if release is not None:
        content = _releasing(content, release)
    return StreamingResponse(content, status_code=status, headers=headers)


def _blob_answer(
    request: Request, digest: str, cache_status: str, size: int, body: Read | None
) -> tuple[int, dict[str, str], AsyncIterator[bytes | memoryview] | None]:
    """Status, headers and body of a blob's answer, with the conditions as Go's
    http.ServeContent (registry:2's blob server) takes them: If-Match (412), If-None-Match
    (304), then Range (206, multipart for several spans) unless If-Range names another
    version."""
    headers = _blob_headers(digest, cache_status, size)
    if_match = request.headers.getlist("if-match")
    if if_match and not names_etag(if_match, headers["ETag"], weak=False):
        return 412, _without_content(headers), None
    if _not_modified(request, digest):
        return 304, _without_content(headers), None
    ranged = if_range_holds(request.headers.get("if-range"), headers["ETag"])
    try:
        spans = parse_ranges(request.headers.get("range"), size) if ranged else []
    except RegistryError as exc:  # a 416 names the blob as well, as Go's does
        exc.headers = {**_without_content(headers), **exc.headers}
        raise
    start, end = spans[0] if len(spans) == 1 else (0, size)
    parts = Byteranges(spans, size, headers["Content-Type"]) if len(spans) > 1 else None
    if len(spans) == 1:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
    elif parts is not None:
        headers["Content-Type"] = parts.content_type
        headers["Content-Length"] = str(parts.length)
    status = 206 if spans else 200
    if body is None:
        return status, headers, None
    return status, headers, body(start, end) if parts is None else parts.body(body)


async def _releasing(
    content: AsyncIterator[bytes | memoryview], release: Callable[[], None]
) -> AsyncIterator[bytes | memoryview]:
    try:
        async for chunk in content:
            yield chunk
    finally:
        release()


def _blob_headers(digest: str, cache_status: str, size: int | None) -> dict[str, str]:
    headers = {
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": BLOB_CACHE_CONTROL,
        "Cache-Status": cache_status,
        "Content-Type": "application/octet-stream",
    }
    if size is not None:
        headers["Content-Length"] = str(size)
    return headers


def _next_page(
    request: Request, upstream: UpstreamClient, answer: UpstreamResponse, asked: str, path: str
) -> dict[str, str]:
    """The upstream's Link to the next page of the list at `asked` as a Link to the mirror's
    `path`: relative (Quay's is absolute, to itself), under the name and `ns` the client
    used, and nothing else. A Link elsewhere (another repository, `//host`), or to another
    page than the next, is nothing to page through here."""
    link = upstream.passable("Link", answer.headers.get("link")) or ""
    _, _, rest = link.partition("<")
    reference, closed, after = rest.partition(">")
    try:
        url = urlsplit(reference)
    except ValueError:  # not a URL at all ("http://[..."): the page goes without a Link
        return {}
    rel = _LINK_REL.search(after.partition(",")[0])  # this link's own parameters
    if not closed or unquote(url.path) != asked or rel is None:
        return {}  # none, or nothing a client could follow
    # Only the client's ns: the upstream's would send its next page to another upstream.
    cursor = [q for q in url.query.split("&") if q and unquote_plus(q.partition("=")[0]) != "ns"]
    query = "&".join(q for q in (*cursor, urlencode(_namespace(request))) if q)
    return {"Link": f'<{path}{"?" if query else ""}{query}>; rel="next"'}


def _named(tags: bytes, name: str) -> bytes:
    """The upstream's tags list under the name the client asked by, as registry:2 and the
    list from the cache name it (the upstream's is `library/x` for `x`, `owner/repo` for
    `quay.io/owner/repo`); anything else goes as it came."""
    try:
        document = json.loads(tags)
    except ValueError:
        return tags
    if not isinstance(document, dict) or "name" not in document:
        return tags
    return json.dumps({**document, "name": name}).encode()


def _namespace(request: Request) -> dict[str, str]:
    """The client's `ns`, which a next page's Link must keep: it picks the upstream (without
    it, the page is the first upstream's repository of that name). A configured one: the
    request came this far."""
    namespace = request.query_params.get("ns")
    return {} if namespace is None else {"ns": namespace}


def _upstream_params(request: Request) -> dict[str, str]:
    """The query of a list the upstream pages, for the upstream: all of it but the mirror's
    own `ns`, and an empty `n` (no `n` to registry:2; a stricter upstream refuses it). A next
    page's Link carries the upstream's cursor, `last` or another (Quay's `next_page`), which
    must reach it as the client sent it back."""
    query = request.query_params.items()
    return {k: v for k, v in query if k != "ns" and (k != "n" or v)}


def _accept(request: Request) -> str | None:
    """All Accept values as one list: clients such as skopeo send one header per type."""
    return parse_accept(request.headers.getlist("accept"))


def _not_modified(request: Request, digest: str, star: bool = True) -> bool:
    """If-None-Match names the content's ETag, or is the bare digest (registry:2 takes that
    for manifests), or is `*` when `star` (Go's http.ServeContent, registry:2's for blobs)."""
    values = request.headers.getlist("if-none-match")
    return names_etag(values, f'"{digest}"', weak=True, star=star) or digest in values


def _without_content(headers: dict[str, str]) -> dict[str, str]:
    """A body-less answer's headers: no Content-Type or Content-Length (as Go sends a 304)."""
    return {k: v for k, v in headers.items() if k not in ("Content-Type", "Content-Length")}


def _moved(request: Request, path: str) -> Response:
    """registry:2's answer to a path off by a slash (Go's http.Redirect): a 301 to `path`, the
    query kept, with a link for a GET or HEAD."""
    query = request.scope["query_string"].decode("latin-1")
    location = f"{path}?{query}" if query else path
    if request.method not in ("GET", "HEAD"):
        return Response(status_code=301, headers={"Location": location})
    link = f'<a href="{html.escape(location)}">Moved Permanently</a>.\n\n'
    return HTMLResponse(link, status_code=301, headers={"Location": location})


def _json(document: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    return Response(json.dumps(document).encode(), headers=headers, media_type="application/json")


def _paginated(
    request: Request,
    key: str,
    items: list[str],
    path: str,
    extra: dict[str, str],
    pages: tuple[int, int] | None = None,
    keep: Mapping[str, str] | None = None,
) -> Response:
    """registry:2's `n`/`last` pagination over a sorted list, with a Link to the next page
    (with the parameters in `keep` too); `pages` is (size without `n`, largest `n`), for a
    list that always comes in pages."""
    last = request.query_params.get("last")
    if last:
        items = [item for item in items if item > last]
    headers = {}
    n_param = request.query_params.get("n")
    count = None if pages is None else pages[0]
    if n_param:  # an empty `n` is none (registry:2 2.8 and 3): a script's unset page size
        count = parse_count(n_param)
        if pages is not None and count > pages[1]:
            raise RegistryError(
                "PAGINATION_NUMBER_INVALID", f"n is over {pages[1]}", {"n": n_param[:32]}
            )
    if count is not None and len(items) > count:
        items = items[:count]
        if items:
            query = urlencode({"last": items[-1], "n": count, **(keep or {})}, safe="/")
            headers["Link"] = f'<{path}?{query}>; rel="next"'
    return _json({**extra, key: items}, headers)

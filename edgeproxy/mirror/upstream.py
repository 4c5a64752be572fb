"""The client for one upstream registry: auth challenges, tokens, and the two transports.

Small requests (manifests, tags, tokens) go through httpx; each blob body goes through a
thread of its own (blobstream.py), off the event loop (see docs/architecture.md). Both share
the auth state: the challenge learnt from the first 401 and the bearer tokens per repository
scope.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import certifi
import httpx

from edgeproxy.config import UpstreamConfig
from edgeproxy.mirror.blobstream import BlobRequest, BlobStream, BlobStreamError, ConnectionPool
from edgeproxy.mirror.cache_status import forwarded
from edgeproxy.mirror.errors import RegistryError, describe
from edgeproxy.mirror.proxies import Proxies, ProxyTransport
from edgeproxy.mirror.shared import SharedCalls

log = logging.getLogger("edgeproxy.upstream")

MAX_METADATA_BODY = 4 * 1024 * 1024  # registry:2's manifest size limit
MAX_TOKEN_BODY = 1024 * 1024  # a token answer (or the probe's): a few KiB in practice
MAX_ERROR_MESSAGE = 1024  # characters of an upstream's error message passed on
# A small answer's body must come at least this fast on average (beyond the time its head
# had): a 4 MiB manifest gets 4 more minutes, a byte now and then gets none.
MIN_BODY_RATE = 16 * 1024  # bytes per second
# Tokens kept (one per repository): past that, the expired go, then the oldest (to be fetched
# again if asked for), so that clients naming ever new repositories cost no memory.
MAX_TOKENS = 256
# Docker Hub's registry hosts send clients to auth.docker.io for tokens: another host, but
# Docker Hub's own, so it gets the credentials without a `token_realms` entry.
_DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})
_DOCKER_HUB_REALM = "auth.docker.io"
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
# An item of a WWW-Authenticate (RFC 9110 11.6.1): an auth-param, or a token without "=",
# the scheme that starts the next challenge (one header may hold several).
_CHALLENGE_ITEM = re.compile(
    r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))|([!#$%&\'*+.^`|~\w-]+)'
)
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


class UpstreamUnavailable(RegistryError):
    """The upstream could not answer: refused, timed out, or a 5xx. A cache may serve stale."""

    def __init__(self, upstream: str, reason: str, upstream_status: int | None = None) -> None:
        super().__init__(
            "UNAVAILABLE",
            f"upstream {upstream} is unavailable: {reason}",
            status=503,
            headers={"Cache-Status": forwarded(upstream_status)},
        )


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: httpx.Headers
    body: bytes


def parse_challenges(headers: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """Every challenge of the WWW-Authenticate `headers`, each as ('bearer', {'realm': ...,
    'service': ..., 'scope': ...}): a header may hold several (`Bearer realm="..", Basic
    realm=".."`), and an upstream may send several headers."""
    challenges: list[tuple[str, dict[str, str]]] = []
    for header in headers:
        for m in _CHALLENGE_ITEM.finditer(header):
            if m.group(4) is not None:
                challenges.append((m.group(4).lower(), {}))
            elif challenges:
                # A quoted-string's quoted-pairs (RFC 9110 5.6.4): a backslash escapes any
                # character.
                value = m.group(3) if m.group(2) is None else _QUOTED_PAIR.sub(r"\1", m.group(2))
                challenges[-1][1][m.group(1).lower()] = value
    return challenges


def parse_token(body: bytes) -> tuple[str, float] | None:
    """The bearer token of a token server's answer and its lifetime, or None: a token goes into
    every request's header as it is, so it must be visible ASCII."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    token = answer.get("token") or answer.get("access_token")
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        return None
    try:
        return token, float(answer.get("expires_in") or 60)
    except (TypeError, ValueError):
        return None


def is_refusal(status: int) -> bool:
    """Whether a status refuses the request itself (a 4xx of the upstream's own), rather than
    saying the way there is closed (a proxy's 407), slow (408) or rate limited (429)."""
    return 400 <= status < 500 and status not in (407, 408, 429)


def registry_error(body: bytes) -> tuple[str | None, str | None]:
    """The code and message of the first error in a registry's `{"errors": [...]}` body, or
    (None, None): a code must look like one (`DENIED`, `PROJECTPOLICYVIOLATION`), a message
    is cut at MAX_ERROR_MESSAGE characters."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    errors = document.get("errors") if isinstance(document, dict) else None
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return None, None
    code, message = first.get("code"), first.get("message")
    if not isinstance(code, str) or not _ERROR_CODE.fullmatch(code):
        return None, None
    return code, message[:MAX_ERROR_MESSAGE] if isinstance(message, str) and message else None


def may_send_credentials(upstream: httpx.URL, realm: httpx.URL, allowed: list[str]) -> bool:
    """Whether a token realm may receive the upstream's username and password.

    dockerd and containerd send them to whatever realm a 401 names; a mirror holding
    credentials for many clients is stricter: only the upstream's own host, Docker Hub's
    auth.docker.io for Docker Hub, or a host in `token_realms`, and never over plain HTTP when
    the upstream itself is HTTPS.
    """
    if upstream.scheme == "https" and realm.scheme != "https":
        return False
    hosts = {upstream.host, *(host.lower() for host in allowed)}
    if upstream.host in _DOCKER_HUB_HOSTS:
        hosts.add(_DOCKER_HUB_REALM)
    return realm.host in hosts


def same_origin(url: httpx.URL, other: httpx.URL) -> bool:
    """Whether two URLs share scheme, host and port (httpx leaves a default port None)."""
    return (url.scheme, url.host, url.port) == (other.scheme, other.host, other.port)


def ssl_context(ca: str | None) -> ssl.SSLContext:
    """The trust an upstream's certificate (and an https:// proxy's on its way) is checked
    with: certifi's bundle; the system's store, as registry:2 (Go) reads it: SSL_CERT_FILE
    when set, and the certificates folder (SSL_CERT_DIR, else /etc/ssl/certs, where
    update-ca-certificates puts a company's CA); and the upstream's `ca`. The folder is read
    as a certificate is looked for: its bundle file, much the same as certifi's, would cost
    50 ms a context."""
    context = ssl.create_default_context(cafile=certifi.where())
    system = ssl.get_default_verify_paths()
    if system.cafile and os.environ.get(system.openssl_cafile_env):
        context.load_verify_locations(cafile=system.cafile)
    if system.capath:
        context.load_verify_locations(capath=system.capath)
    if ca:
        context.load_verify_locations(cafile=ca)
    return context


class UpstreamClient:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name
        ca = str(config.ca) if config.ca else None
        self._ssl = ssl_context(ca)
        proxies = Proxies.from_environment()
        self._http = httpx.AsyncClient(
            base_url=config.base_url,
            # The proxies are chosen by `proxies`, the blob threads' rule, not httpx's own.
            trust_env=False,
            transport=ProxyTransport(
                proxies,
                # An https:// proxy's certificate, checked as the upstream's (Go's one RootCAs).
                proxy_tls=functools.partial(ssl_context, ca),
                http2=True,
                verify=self._ssl,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            ),
            follow_redirects=True,
            # Manifests must match their digest byte for byte: no content coding (httpx offers
            # gzip by default); one sent all the same is decoded (aiter_bytes), as Go's
            # transport decodes it.
            headers={"Accept-Encoding": "identity"},
            timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
        )
        # A context of its own: httpx offers h2 by ALPN on the one it is given, and http.client
        # speaks HTTP/1.1 only (a server that picked h2 would answer in frames).
        blob_tls = ssl_context(ca)
        blob_tls.set_alpn_protocols(["http/1.1"])
        self._blob_connections = ConnectionPool(
            blob_tls, config.connect_timeout, config.read_timeout, proxies
        )
        base = httpx.URL(config.base_url)
        proxy = proxies.choose(base.scheme, base.netloc.decode("ascii"))
        if proxy:
            log.info("upstream %s: through the proxy %s", self.name, proxy.shown)
        # httpx's timeouts bound each read, not an answer that comes a byte now and then:
        # a small answer's head gets a connect and two reads' worth of time in all, and its
        # body more as it comes (MIN_BODY_RATE).
        self._deadline = config.connect_timeout + 2 * config.read_timeout
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._probed = False
        self._probe_lock = asyncio.Lock()  # concurrent first requests wait for the one probe
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (Authorization, expiry)
        self._token_fetches: SharedCalls[str, tuple[str, float]] = SharedCalls()
        self._warned_realms: set[str] = set()

    async def aclose(self) -> None:
        await self._http.aclose()
        self._blob_connections.close()

    # Auth
    async def _probe(self) -> None:
        """Learn the upstream's challenge from `GET /v2/` once, as registry:2 does at start, so
        that even a worker's first blob requests go out authorized (no 401 round trip)."""
        async with self._probe_lock:
            if self._probed:
                return
            try:
                response, _ = await self._exchange("GET", "/v2/", "GET /v2/", MAX_TOKEN_BODY)
            except UpstreamUnavailable:
                return  # down now: the real request says so, and a 401 later still teaches us
            finally:
                self._probed = True  # only now: the requests waiting on the lock go out after it
            if response.status_code == 401:
                self._learn(response.headers.get_list("www-authenticate"), None)

    async def _authorization(self, name: str, wanted: Sequence[str] = ()) -> dict[str, str]:
        """The Authorization for a request of repository `name`; a token is asked for the
        scopes `wanted` (by a 401's challenge) too."""
        if not self._probed:
            await self._probe()
        if self._challenge is None:
            return {}
        scheme, params = self._challenge
        if scheme == "basic":
            pair = f"{self.config.username}:{self.config.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        scope = f"repository:{name}:pull"
        scopes = [scope, *(other for other in wanted if other != scope)]
        cached = self._tokens.get(scope)
        if not cached or cached[1] <= time.monotonic():
            # Concurrent requests of a repository share one token request.
            cached = await self._token_fetches.run(
                " ".join(scopes), lambda: self._renew(params, scopes)
            )
        return {"Authorization": cached[0]}

    async def _renew(self, params: dict[str, str], scopes: list[str]) -> tuple[str, float]:
        """A new token for `scopes`, kept as the one of the first (the pull scope) until it
        expires: those a challenge added are asked for again only after the next 401."""
        scope = scopes[0]
        token = await self._fetch_token(params, scopes)
        if len(self._tokens) >= MAX_TOKENS:
            now = time.monotonic()
            for expired in [s for s, (_, expiry) in self._tokens.items() if expiry <= now]:
                del self._tokens[expired]
            while len(self._tokens) >= MAX_TOKENS:
                del self._tokens[next(iter(self._tokens))]  # the oldest fetched
        self._tokens.pop(scope, None)  # stored anew: the newest
        self._tokens[scope] = token
        return token

    def _learn(self, headers: Sequence[str], name: str | None) -> list[str] | None:
        """Take a 401's challenge: Bearer when one is offered, else Basic, as Docker and
        registry:2's proxy pick among several; the scopes it names (containerd asks for them
        too, as the retry does), or None when retrying with new credentials cannot help."""
        challenges = parse_challenges(headers)
        usable = [
            (scheme, params)
            for scheme, params in challenges
            if (scheme == "bearer" and "realm" in params)
            or (scheme == "basic" and self.config.username)
        ]
        bearer = [challenge for challenge in usable if challenge[0] == "bearer"]
        if not usable:
            return None
        scheme, params = (bearer or usable)[0]
        self._challenge = (scheme, {k: v for k, v in params.items() if k != "scope"})
        if name is not None:
            self._tokens.pop(f"repository:{name}:pull", None)
        return params.get("scope", "").split()

    async def _fetch_token(self, params: dict[str, str], scopes: list[str]) -> tuple[str, float]:
        query: dict[str, str | list[str]] = {"scope": scopes}
        if "service" in params:
            query["service"] = params["service"]
        base = httpx.URL(self.config.base_url)
        try:
            realm = base.join(params["realm"])
        except httpx.InvalidURL as exc:
            raise UpstreamUnavailable(self.name, "its token realm is not a URL") from exc
        auth = None
        if self.config.username:
            if may_send_credentials(base, realm, self.config.token_realms):
                auth = (self.config.username, self.config.password)
            elif realm.host not in self._warned_realms:
                self._warned_realms.add(realm.host)
                log.warning(
                    "upstream %s: token realm %s://%s may not receive its credentials; asking "
                    "it anonymously (list the host in token_realms to allow it)",
                    self.name,
                    realm.scheme,
                    realm.host,
                )
        # Added to the realm's own query (a tenant, an account), as registry:2 does: httpx's
        # `params` would replace it. httpx drops the Authorization of a redirect to another
        # origin.
        url = realm.copy_merge_params(query)
        response, body = await self._exchange("GET", url, "token server", MAX_TOKEN_BODY, auth=auth)
        if response.status_code in (401, 403):
            raise RegistryError("DENIED", f"upstream {self.name} refused the credentials")
        if response.status_code != 200:
            raise UpstreamUnavailable(self.name, f"token server answered {response.status_code}")
        usable = parse_token(body)
        if usable is None:
            log.warning("upstream %s: the token server's answer holds no usable token", self.name)
            raise UpstreamUnavailable(self.name, "token server sent no usable token")
        token, lifetime = usable
        # Renew a little early so that a token never expires between fetch and use.
        return f"Bearer {token}", time.monotonic() + max(lifetime * 0.9, lifetime - 30)

    # Small requests
    async def request(
        self,
        method: str,
        path: str,
        name: str,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> UpstreamResponse:
        """One small request, authorized, its body read whole (at most 4 MiB)."""
        wanted: list[str] = []
        for attempt in range(2):
            auth = await self._authorization(name, wanted)
            response, body = await self._exchange(
                method,
                path,
                f"{method} {path}",
                MAX_METADATA_BODY,
                headers={**(headers or {}), **auth},
                params=params,
            )
            challenges = response.headers.get_list("www-authenticate")
            # A 401 from where the upstream redirected to is that server's: its challenge
            # must not replace the upstream's (as in open_blob).
            own = same_origin(response.url, self._http.base_url)
            if response.status_code == 401 and own and attempt == 0:
                learnt = self._learn(challenges, name)
                if learnt is not None:
                    wanted = learnt
                    continue
            return UpstreamResponse(response.status_code, response.headers, body)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(
        self,
        method: str,
        url: httpx.URL | str,
        what: str,
        limit: int,
        headers: dict[str, str] | None = None,
        params: Mapping[str, str | list[str]] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> tuple[httpx.Response, bytes]:
        """Send one small request (`what`, for messages); the answer and its body, read whole
        unless over `limit`, within the deadline. Any failure to get them is UpstreamUnavailable."""
        deadline = asyncio.get_running_loop().time() + self._deadline
        for attempt in range(2):
            answered = False
            try:
                async with (
                    asyncio.timeout_at(deadline) as timeout,
                    self._http.stream(
                        method, url, headers=headers, params=params, auth=auth
                    ) as response,
                ):
                    answered = True
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > limit:
                            reason = f"{what}: answer over {limit >> 20} MiB"
                            raise UpstreamUnavailable(self.name, reason)
                        timeout.reschedule(deadline + len(body) / MIN_BODY_RATE)
                    return response, bytes(body)
            except* TimeoutError:
                reason = f"{what}: no whole answer in time (a connect, two reads, 16 KiB/s)"
                log.warning("upstream %s: %s", self.name, reason)
                raise UpstreamUnavailable(self.name, reason) from None
            # A URL that parses but that no socket takes (a realm or a redirect to port 99999)
            # fails below httpx, as an OverflowError or ValueError in anyio's task group.
            except* (httpx.HTTPError, httpx.InvalidURL, OverflowError, ValueError) as group:
                exc: BaseException = group
                while isinstance(exc, BaseExceptionGroup):
                    exc = exc.exceptions[0]
                # A kept-alive connection the server (or a proxy: tinyproxy) closed as the
                # request went out: nothing came back, and a GET or HEAD may go again, on a
                # new connection, as Go's client and the blob threads resend it.
                resend = (
                    attempt == 0
                    and not answered
                    and method in ("GET", "HEAD")
                    and isinstance(exc, httpx.RemoteProtocolError)
                )
                if not resend:
                    log.warning("upstream %s: %s failed: %r", self.name, what, exc)
                    reason = describe(exc)
                    if isinstance(exc, httpx.ProxyError):  # its status line says why
                        reason = f"through the proxy: {str(exc)[:120]}"
                    raise UpstreamUnavailable(self.name, f"{what}: {reason}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # Blob streams
    async def open_blob(self, name: str, digest: str, block_size: int) -> BlobStream:
        """A started 200 response for the blob, read in `block_size` blocks; the caller
        closes it."""
        url = f"{self.config.base_url}/v2/{name}/blobs/{digest}"
        wanted: list[str] = []
        for attempt in range(2):
            auth = await self._authorization(name, wanted)
            request = BlobRequest(url, auth, self._blob_connections)
            stream = BlobStream(request, block_size)
            try:
                await stream.open()
            except BlobStreamError as exc:
                stream.close()
                log.warning("upstream %s: GET blob %s failed: %s", self.name, digest, exc)
                raise UpstreamUnavailable(self.name, str(exc)) from exc
            except BaseException:
                stream.close()
                raise
            if stream.whole:
                return stream
            stream.close()
            challenges = stream.headers.get_all("WWW-Authenticate") or []
            # A CDN's 401 is the CDN's: its challenge must not replace the upstream's.
            own = not stream.redirected
            if stream.status == 401 and own and attempt == 0:
                learnt = self._learn(challenges, name)
                if learnt is not None:
                    wanted = learnt
                    continue
            raise self.error(stream.status, "BLOB_UNKNOWN", stream.headers.get("Retry-After"))
        raise AssertionError("unreachable")  # pragma: no cover

    def passable(self, header: str, value: str | None) -> str | None:
        """An upstream header's value fit to pass on to a client, else None: printable ASCII
        only (httpx decodes UTF-8, which a response head cannot carry: it was a 500)."""
        if value is None or (value.isascii() and value.isprintable()):
            return value
        log.warning("upstream %s: %s is not printable ASCII; not passed on", self.name, header)
        return None

    def error(
        self, status: int, not_found: str, retry_after: str | None = None, body: bytes = b""
    ) -> RegistryError:
        """The registry error a client sees for an upstream's non-success status (and `body`,
        its error when it came with one)."""
        retry_after = self.passable("Retry-After", retry_after)
        cache = {"Cache-Status": forwarded(status)}
        if status == 404:
            return RegistryError(not_found, f"not found at upstream {self.name}", headers=cache)
        if status in (401, 403):
            return RegistryError("DENIED", f"upstream {self.name} denied access", headers=cache)
        if status == 429:
            if retry_after:
                cache["Retry-After"] = retry_after
            return RegistryError(
                "TOOMANYREQUESTS", f"upstream {self.name} is rate limiting", headers=cache
            )
        if status == 407:  # from an HTTP_PROXY of the environment, not from the upstream
            return UpstreamUnavailable(self.name, "its proxy asks for credentials (407)", status)
        if is_refusal(status):
            # A refusal of the upstream's own (Harbor's 412 for a vulnerable image, a 451, a
            # 410, a 400): passed on as a 4xx with its code and message, so that the client
            # learns why and does not retry what a 503 says will pass.
            code, message = registry_error(body)
            said = f"upstream {self.name} answered {status}" + (f": {message}" if message else "")
            return RegistryError(code or "UNKNOWN", said, status=status, headers=cache)
        return UpstreamUnavailable(self.name, f"answered {status}", status)

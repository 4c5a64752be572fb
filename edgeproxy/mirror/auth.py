"""Who may pull from the mirror: htpasswd users, the mirror's own bearer tokens, anonymous rules.

Clients see what a registry:2 with a token server shows them: `GET /v2/` and every request
without valid credentials get 401 with `WWW-Authenticate: Bearer realm=".../token",...`; the
realm (served by the mirror itself) trades htpasswd credentials for a short-lived JWT. HTTP
Basic is accepted on every request too (curl, simple clients). Every worker process signs and
verifies with one key, created once in the cache root.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import bcrypt
from starlette.requests import Request
from starlette.responses import Response

from edgeproxy.config import AuthConfig, MirrorConfig
from edgeproxy.mirror.errors import RegistryError
from edgeproxy.mirror.names import Route, Target

log = logging.getLogger("edgeproxy.auth")

TOKEN_PATH = "/token"

# _jwt_imported_late: PyJWT loads `cryptography` (~19 MB in every worker process); a mirror
# without [mirror.auth] never signs or checks a token, so it imports jwt only when it does.
ISSUER = "edgeproxy"
KEY_FILE = "edgeproxy/auth.key"
_ALGORITHM = "HS256"
# Checked against when the user is unknown and the file has no entry to take the cost of.
_DUMMY_HASH = bcrypt.hashpw(b"not a password", bcrypt.gensalt(5))
MAX_FORM = 64 * 1024
_HOST = re.compile(r"[A-Za-z0-9._\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")
MAX_REMEMBERED_TOKENS = 4096
_VERIFIED_TTL = 60.0  # seconds a verified user:password pair skips bcrypt


@dataclass(frozen=True)
class Access:
    """What a request needs: a repository (as the client names it) or the registry itself."""

    scope: str | None  # the token scope a client should ask for; None for `GET /v2/`
    anonymous: bool  # the configuration lets anyone have it


class Htpasswd:
    """bcrypt entries (`htpasswd -B`), read again when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: int | None = None
        self._users: dict[str, bytes] = {}
        self._unknown_user_hash = _DUMMY_HASH
        self._verified: dict[bytes, float] = {}  # sha256(user, password, hash) -> until
        self._load()

    def _load(self) -> None:
        try:
            stat = self.path.stat()
            if stat.st_mtime_ns == self._mtime:
                return
            text = self.path.read_text()
        except OSError as exc:  # keep the users we had: a file being replaced is not "no one"
            log.error("htpasswd %s: cannot read: %s", self.path, exc.strerror or exc)
            return
        users = {}
        for number, line in enumerate(text.splitlines(), 1):
            user, sep, hashed = line.strip().partition(":")
            if not sep or not user:
                continue
            if not hashed.startswith(("$2y$", "$2a$", "$2b$")):
                log.warning("htpasswd %s:%d: not a bcrypt entry, ignored", self.path, number)
                continue
            users[user] = hashed.encode()
        self._users, self._mtime = users, stat.st_mtime_ns
        # An unknown user is checked against the costliest entry (a password right for it
        # is still refused): a wrong user then costs what a wrong password does, and the
        # time of an answer does not tell which users exist.
        self._unknown_user_hash = max(users.values(), key=_cost, default=_DUMMY_HASH)
        self._verified.clear()

    def remembered(self, user: str, password: str) -> bool:
        """True when this pair was verified in the last minute (and the file did not change):
        cheap, so a client sending Basic on every request costs no bcrypt and no thread."""
        self._load()
        return self._verified.get(self._pair(user, password), 0.0) > time.monotonic()

    def verify(self, user: str, password: str) -> bool:
        """True when `password` is `user`'s; blocks for bcrypt's time (call it in a thread)."""
        if self.remembered(user, password):
            return True
        hashed = self._users.get(user)
        try:
            checked = hashed or self._unknown_user_hash
            ok = bcrypt.checkpw(password.encode(), checked) and hashed is not None
        except ValueError:  # a malformed hash in the file
            ok = False
        if ok:
            self._verified[self._pair(user, password)] = time.monotonic() + _VERIFIED_TTL
        return ok

    def _pair(self, user: str, password: str) -> bytes:
        hashed = self._users.get(user, b"")
        return hashlib.sha256(b"\0".join([user.encode(), password.encode(), hashed])).digest()


def _cost(hashed: bytes) -> int:
    """The cost of a bcrypt hash ("$2y$10$..." is 10); 0 when malformed."""
    digits = hashed[4:6]
    return int(digits) if digits.isdigit() else 0


def exposed_credentials(config: MirrorConfig) -> list[str]:
    """Warnings for upstream credentials anyone may use through the mirror: its pulls are
    authorized with them, so a private image becomes as public as the mirror."""
    warnings = []
    for upstream in config.upstream:
        if not upstream.username:
            continue
        if config.auth is None:
            reason = "and [mirror.auth] is not set"
        elif upstream.name in config.auth.anonymous_upstreams:
            reason = "and mirror.auth.anonymous_upstreams lets anyone pull from it"
        elif config.auth.anonymous:
            reason = "and mirror.auth.anonymous patterns may cover its repositories"
        else:
            continue
        warnings.append(
            f"upstream {upstream.name} has credentials {reason}: "
            "whoever reaches the mirror may pull what they can"
        )
    return warnings


def signing_key(root: Path) -> bytes:
    """The key every worker signs tokens with: made once in the cache root (0600), then read.

    Written to a temporary file and hard-linked into place, so that two workers starting at
    once end up with the same key.
    """
    path = root / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, secrets.token_bytes(32))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
        temporary.unlink()
    key = path.read_bytes()
    if len(key) < 32:
        raise RuntimeError(f"{path}: too short for a signing key; remove it to make a new one")
    return key


class Authenticator:
    """The mirror's access control: checks requests, issues tokens at `TOKEN_PATH`."""

    def __init__(self, config: AuthConfig, root: Path) -> None:
        self.config = config
        self.htpasswd = Htpasswd(config.htpasswd)
        self._key = signing_key(root)
        self._valid: dict[str, dict[str, Any]] = {}  # token -> its verified claims
        # bcrypt in a thread of its own, one check at a time: a flood of wrong passwords
        # (~0.5 s each at cost 12) waits there, not in the loop's default threads, which read
        # cold blobs, commit fills and probe the storage for every pull.
        self._bcrypt = ThreadPoolExecutor(1, thread_name_prefix="bcrypt")

    # What a request needs
    def access(self, route: Route, target: Target | None) -> Access:
        if route.kind == "base":
            return Access(None, False)
        if route.kind == "catalog" or target is None:
            return Access("registry:catalog:*", False)
        anonymous = target.upstream.name in self.config.anonymous_upstreams or any(
            fnmatch.fnmatchcase(target.local_name, pattern) for pattern in self.config.anonymous
        )
        return Access(f"repository:{route.name}:pull", anonymous)

    async def check(self, request: Request, access: Access) -> None:
        """Return when the request may have `access`; raise UNAUTHORIZED (401) otherwise."""
        if access.anonymous:
            return
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and await self._basic_user(credentials) is not None:
            return
        if scheme == "bearer" and self._token_grants(credentials.strip(), access):
            return
        raise self._unauthorized(request, access, "authentication required")

    def _claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a valid token of ours; verified ones are remembered until they expire
        (a check costs ~65 µs, a pull makes dozens of requests with one token)."""
        cached = self._valid.get(token)
        if cached is not None and cached["exp"] > time.time():
            return cached
        import jwt  # here, not at the top: see _jwt_imported_late

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                audience=self.config.service,
                issuer=ISSUER,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError:
            return None
        if len(self._valid) >= MAX_REMEMBERED_TOKENS:
            self._valid.clear()
        self._valid[token] = claims
        return claims

    def _token_grants(self, token: str, access: Access) -> bool:
        claims = self._claims(token)
        if claims is None:
            return False
        if access.scope is None:  # `GET /v2/`: any token of ours, as registry:2's token auth
            return True
        if not claims["sub"]:  # an anonymous token grants only what anonymous rules grant
            return False
        kind, _, rest = access.scope.partition(":")
        name, _, _ = rest.rpartition(":")
        return any(
            isinstance(entry, dict)
            and entry.get("type") == kind
            and entry.get("name") == name
            and ("pull" in entry.get("actions", ()) or "*" in entry.get("actions", ()))
            for entry in claims.get("access", [])
        )

    def _unauthorized(self, request: Request, access: Access, message: str) -> RegistryError:
        challenge = f'Bearer realm="{self.realm(request)}",service="{self.config.service}"'
        detail: list[dict[str, str]] | None = None
        if access.scope is not None:
            challenge += f',scope="{access.scope}"'
            kind, _, rest = access.scope.partition(":")
            name, _, action = rest.rpartition(":")
            detail = [{"Type": kind, "Name": name, "Action": action}]
        return RegistryError(
            "UNAUTHORIZED", message, detail, headers={"WWW-Authenticate": challenge}
        )

    def realm(self, request: Request) -> str:
        """The configured realm, or this mirror's token URL as the client reached it: through
        a proxy, as its X-Forwarded-Proto and X-Forwarded-Host say. Believed from any address,
        as registry:2 believes them for its URLs: uvicorn believes 127.0.0.1 only, and a proxy
        on another host that ends TLS would have its clients send passwords to http. A client
        that sends them itself misleads no one but itself."""
        if self.config.realm:
            return self.config.realm
        headers = request.headers
        # A quote would end the realm's quoted string: only a host name shapes it.
        names = (_first(headers.get("x-forwarded-host")), headers.get("host", ""))
        host = next((name for name in names if _HOST.fullmatch(name)), "localhost")
        scheme = _first(headers.get("x-forwarded-proto")).lower()
        if scheme not in ("http", "https"):
            # The scope's scheme, not request.url's: building that URL decodes the query
            # string as UTF-8, and a client may send any bytes there.
            scheme = request.scope.get("scheme", "http")
        return f"{scheme}://{host}{TOKEN_PATH}"

    async def _basic_user(self, credentials: str) -> str | None:
        try:
            user, sep, password = (
                base64.b64decode(credentials, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep or not user:
            return None
        if self.htpasswd.remembered(user, password):
            return user
        return user if await self._verify(user, password) else None

    async def _verify(self, user: str, password: str) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._bcrypt, self.htpasswd.verify, user, password)

    # The token endpoint
    async def token(self, request: Request) -> Response:
        """Docker's token GET (Basic auth, `scope`s in the query) and the OAuth2 POST form
        (`grant_type=password`) that containerd sends; anonymous requests get a token too."""
        if request.method == "POST":
            form = await _form(request)
            if form.get("grant_type") != ["password"]:
                raise RegistryError(
                    "UNSUPPORTED", "only grant_type=password is supported", status=400
                )
            user = form.get("username", [""])[0]
            password = form.get("password", [""])[0]
            ok = bool(user) and await self._verify(user, password)
            scopes = " ".join(form.get("scope", [])).split()
            authenticated: str | None = user if ok else None
            refused = not ok
        elif request.method == "GET":
            scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
            authenticated, refused = None, False
            if scheme:
                authenticated = (
                    await self._basic_user(credentials) if scheme.lower() == "basic" else None
                )
                refused = authenticated is None
            scopes = " ".join(request.query_params.getlist("scope")).split()
        else:
            raise RegistryError("UNSUPPORTED", "use GET or POST", headers={"Allow": "GET, POST"})
        if refused:
            client = request.client.host if request.client else "-"
            log.info("token: credentials refused for a client at %s", client)
            raise RegistryError(
                "UNAUTHORIZED",
                "incorrect username or password",
                headers={"WWW-Authenticate": f'Basic realm="{self.config.service}"'},
            )
        return _token_response(self._issue(authenticated, scopes))

    def _issue(self, user: str | None, scopes: list[str]) -> dict[str, Any]:
        now = int(time.time())
        lifetime = max(60, int(self.config.token_ttl))  # docker clients assume at least 60 s
        access = [] if user is None else [_grant(scope) for scope in scopes]
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": self.config.service,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": secrets.token_hex(12),
            "access": [entry for entry in access if entry is not None],
        }
        import jwt  # here, not at the top: see _jwt_imported_late

        token = jwt.encode(claims, self._key, algorithm=_ALGORITHM)
        issued = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"token": token, "access_token": token, "expires_in": lifetime, "issued_at": issued}


async def _form(request: Request) -> dict[str, list[str]]:
    """The OAuth2 form, urlencoded, at most 64 KiB."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise RegistryError("UNSUPPORTED", "token form too large", status=413)
    return parse_qs(body.decode("latin-1"))


def _first(value: str | None) -> str:
    """The first of a forwarded header's comma-separated values (the one its client sent)."""
    return (value or "").partition(",")[0].strip()


def _grant(scope: str) -> dict[str, Any] | None:
    """What an htpasswd user gets of a requested scope: pull on any repository, the catalog."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    wanted = set(actions.split(","))
    if kind == "repository" and name and "pull" in wanted:
        return {"type": kind, "name": name, "actions": ["pull"]}
    if kind == "registry" and name == "catalog" and "*" in wanted:
        return {"type": kind, "name": name, "actions": ["*"]}
    return None


def _token_response(answer: Mapping[str, Any]) -> Response:
    return Response(
        json.dumps(answer).encode(),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )

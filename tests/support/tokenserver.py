"""A Docker Hub style bearer-token server: the `auth.token` realm of a test registry.

It answers `GET <realm>?service=...&scope=...` (anonymous or HTTP Basic) and the OAuth2
`POST <realm>` form (`grant_type=password` or `refresh_token`) that containerd sends.
Anonymous clients get `pull` on every repository; the configured users get `pull` and `push`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ANONYMOUS_ACTIONS = frozenset({"pull"})
USER_ACTIONS = frozenset({"pull", "push"})

Answer = tuple[str | None, dict[str, object]]  # (authenticated user or None, JSON body)


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    method: str  # "GET" or "POST"
    user: str | None  # the authenticated user; None when anonymous or refused
    grant_type: str | None  # the POST form's grant_type; None for GET
    scopes: list[str]
    status: int


class AuthError(Exception):
    """A request the token server refuses; carries the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The key id docker/libtrust derives from a public key (what registry:2 matches `kid` to)."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def _self_signed_cert(key: rsa.RSAPrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )


def _scopes(values: list[str]) -> list[str]:
    """Scopes from repeated `scope` parameters, each possibly space-separated (OAuth2 form)."""
    return [scope for value in values for scope in value.split()]


def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """Split `type:name:actions` (the name may itself hold ':'); None when malformed."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Issues RS256 JWTs that registry:2 accepts, on a background ThreadingHTTPServer."""

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        *,
        service: str = "edgeproxy-test-registry",
        issuer: str = "edgeproxy-test-issuer",
        expires_in: int = 300,
        address: str = "127.0.0.1",
    ) -> None:
        """`address`: the IPv4 address it listens on, and its realm names."""
        self.users = dict(users)
        self.address = address
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in  # seconds; tests may lower it (registry:2 allows 60 s leeway)
        self.requests: list[TokenRequest] = []
        self._refresh_tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = libtrust_key_id(self._key.public_key())
        self.rootcertbundle = workdir / "token-root.crt"
        cert = _self_signed_cert(self._key, issuer)
        self.rootcertbundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._httpd = ThreadingHTTPServer((address, 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"token-server-{self.port}", daemon=True
        )
        self._thread.start()

    @property
    def realm(self) -> str:
        """The URL registries put in their `Bearer realm=...` challenge."""
        return f"http://{self.address}:{self.port}/token"

    @property
    def token_requests(self) -> int:
        """How many token requests were answered (granted or not)."""
        with self._lock:
            return len(self.requests)

    def public_key(self) -> rsa.RSAPublicKey:
        """The key that verifies issued tokens."""
        return self._key.public_key()

    def close(self) -> None:
        """Stop serving."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def issue(self, user: str | None, scopes: list[str]) -> str:
        """A signed JWT granting `user` (None: anonymous) what it may have of `scopes`."""
        allowed = USER_ACTIONS if user else ANONYMOUS_ACTIONS
        access: dict[tuple[str, str], list[str]] = {}
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None:
                continue
            kind, name, actions = parsed
            granted = access.setdefault((kind, name), [])
            if kind == "repository":
                granted += [a for a in actions if a in allowed and a not in granted]
        now = int(dt.datetime.now(dt.UTC).timestamp())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": [
                {"type": kind, "name": name, "actions": actions}
                for (kind, name), actions in access.items()
            ],
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.key_id})

    def answer_get(self, query: dict[str, list[str]], authorization: str | None) -> Answer:
        """The user and JSON answer for the Docker token GET; raises AuthError to refuse."""
        user = self._basic_user(authorization)
        self._check_service(query)
        offline = query.get("offline_token", [""])[0] == "true"
        return user, self._grant(user, _scopes(query.get("scope", [])), refresh=offline)

    def answer_post(self, form: dict[str, list[str]]) -> Answer:
        """The user and JSON answer for the OAuth2 token POST; raises AuthError to refuse."""
        self._check_service(form)
        grant = form.get("grant_type", [""])[0]
        scopes = _scopes(form.get("scope", []))
        if grant == "password":
            username = form.get("username", [""])[0]
            user = self._authenticate(username, form.get("password", [""])[0])
            return user, self._grant(user, scopes, refresh=form.get("access_type") == ["offline"])
        if grant == "refresh_token":
            with self._lock:
                owner = self._refresh_tokens.get(form.get("refresh_token", [""])[0])
            if owner is None:
                raise AuthError(401, "invalid refresh token")
            return owner, self._grant(owner, scopes, refresh=True)
        raise AuthError(400, f"unsupported grant_type {grant!r}")

    def record(self, request: TokenRequest) -> None:
        """Remember one answered request."""
        with self._lock:
            self.requests.append(request)

    def _grant(self, user: str | None, scopes: list[str], *, refresh: bool) -> dict[str, object]:
        token = self.issue(user, scopes)
        issued_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        answer: dict[str, object] = {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued_at.replace("+00:00", "Z"),
            "scope": " ".join(scopes),
        }
        if refresh and user:
            refresh_token = secrets.token_urlsafe(24)
            with self._lock:
                self._refresh_tokens[refresh_token] = user
            answer["refresh_token"] = refresh_token
        return answer

    def _basic_user(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise AuthError(401, f"unsupported authorization scheme {scheme!r}")
        try:
            username, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise AuthError(400, "malformed basic credentials") from exc
        return self._authenticate(username, password)

    def _authenticate(self, username: str, password: str) -> str:
        if not username or self.users.get(username) != password:
            raise AuthError(401, "incorrect username or password")
        return username

    def _check_service(self, params: dict[str, list[str]]) -> None:
        service = params.get("service", [self.service])[0]
        if service != self.service:
            raise AuthError(400, f"unknown service {service!r}")


def _make_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            authorization = self.headers.get("Authorization")
            self._serve(url.path, "GET", query, lambda: server.answer_get(query, authorization))

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            form = parse_qs(body.decode())
            self._serve(url.path, "POST", form, lambda: server.answer_post(form))

        def _serve(
            self,
            path: str,
            method: str,
            params: dict[str, list[str]],
            answer: Callable[[], Answer],
        ) -> None:
            if path != "/token":
                self._send(404, {"error": "not found"})
                return
            grant_type = params.get("grant_type", [None])[0] if method == "POST" else None
            status = 200
            try:
                user, payload = answer()
            except AuthError as exc:
                status, user = exc.status, None
                payload = {"error": str(exc), "details": str(exc)}
            scopes = _scopes(params.get("scope", []))
            server.record(TokenRequest(method, user, grant_type, scopes, status))
            self._send(status, payload)

        def _send(self, status: int, payload: dict[str, object]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="edgeproxy-test-token"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet: `requests` records what matters."""

    return Handler

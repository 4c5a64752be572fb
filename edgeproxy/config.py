"""The `proxy.toml` model: validated once at start-up, typed everywhere after.

Durations ("300s", "1h30m") become seconds and sizes ("1024m", "200GiB") become
bytes here, so no other module parses a config string.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATHS = (Path("proxy.toml"), Path("/etc/edgeproxy/proxy.toml"))

SHUTDOWN_TIMEOUT = 60.0  # seconds; systemd's TimeoutStopSec in the unit is longer
MAX_DURATION = 10 * 365 * 86400.0  # past any timeout or interval anyone means; keeps timers finite
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(value: object) -> float:
    """Seconds from "300s", "1h30m", "250ms" or a bare number of seconds (as nginx takes)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"not a duration: {value!r} (use e.g. '30s', '5m', '168h')")
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError(f"not a duration: {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if not seconds <= MAX_DURATION:  # TOML takes inf and nan
        raise ValueError(f"not a duration: {value!r} (at most 10 years)")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from "1024m" (nginx style, powers of 1024), "200GiB", "10MB" or a bare number."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if not match:
            raise ValueError(f"not a size: {value!r} (use e.g. '1024m', '200GiB')")
        number, prefix, suffix = match.groups()
        # "MB" is decimal; "m", "M", "MiB" are binary, as nginx and registry:2 users expect.
        base = 1000 if suffix.lower() == "b" and prefix else 1024
        scaled = float(number) * base ** _SIZE_POWERS[prefix.lower()]
        if not math.isfinite(scaled):
            raise ValueError(f"not a size: {value!r} (too large)")
        size = int(scaled)
    else:
        raise ValueError(f"not a size: {value!r}")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_address(value: object) -> tuple[str, int]:
    """("host", port) from "0.0.0.0:5000", ":5000" or "[::1]:5000"."""
    if not isinstance(value, str):
        raise ValueError(f"not an address: {value!r}")
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(\d{1,5})", value.strip())
    if not match or not 0 <= int(match.group(2)) <= 65535:
        raise ValueError(f"not an address: {value!r} (use 'host:port', e.g. '0.0.0.0:5000')")
    host = match.group(1).strip("[]") or "0.0.0.0"
    return host, int(match.group(2))


def _no_nul(value: object) -> object:
    """A path or header with a NUL byte cannot reach the OS: refused here, not at first use."""
    if isinstance(value, str) and "\0" in value:
        raise ValueError("contains a NUL byte")
    return value


def _header_name(name: str) -> str:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"not an HTTP header name: {name!r}")
    if name.lower() in _FRAMING:
        raise ValueError(f"{name} is the server's to set (it frames the message)")
    return name


def _header_value(value: str) -> str:
    if not _FIELD_VALUE.fullmatch(value):
        raise ValueError(f"not an HTTP header value (control characters): {value!r}")
    return value


# Headers that frame or route a message: a configured one would break every answer.
_FRAMING = {
    "connection", "content-length", "keep-alive", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade",
}  # fmt: skip
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no CR, LF or other controls


def _workers(value: object) -> object:
    if value == "auto" or (type(value) is int and 1 <= value <= 256):
        return value
    raise ValueError(f'{value!r}: use "auto" (one per CPU) or a number of processes, 1 to 256')


def _matching(pattern: str, wanted: str) -> AfterValidator:
    """A string check whose error says what is wanted (pydantic's would quote the regex), not
    what was given (a URL may hold a password)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"not {wanted}")
        return value

    return AfterValidator(check)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Workers = Annotated[Literal["auto"] | int, BeforeValidator(_workers)]
RegistryHost = Annotated[
    str,
    _matching(
        r"[A-Za-z0-9][A-Za-z0-9.\-]*(:\d+)?",
        "a registry host name (e.g. docker.io, ghcr.io, localhost:5000)",
    ),
]
# No user:password@ in the URL: credentials live in username/password, never in a URL that
# could be logged.
UpstreamUrl = Annotated[
    str,
    _matching(r"https?://[^/\s@]+/?", "http(s)://host[:port] (no path, no user@: see username)"),
]
Backend = Annotated[
    str, _matching(r"embedded|https?://[^/\s]+/?", '"embedded" or http(s)://host[:port]')
]
# Quoted in the challenge (`Bearer realm="...",service="..."`): a quote, a backslash or a
# control character would end or break it; clients need the realm's scheme.
ChallengeService = Annotated[
    str, _matching(r"[!#-\[\]-~]+", 'a service name (visible ASCII, no " or \\)')
]
ChallengeRealm = Annotated[
    str, _matching(r'(https?://[^/\s"\\]+(/[^\s"\\]*)?)?', "empty or an http(s):// URL")
]
Size = Annotated[int, BeforeValidator(parse_size)]
Address = Annotated[tuple[str, int], BeforeValidator(parse_address)]
FilePath = Annotated[Path, BeforeValidator(_no_nul)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
HeaderValue = Annotated[str, AfterValidator(_header_value)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Model):
    """One registry the mirror pulls through."""

    name: RegistryHost
    url: UpstreamUrl
    username: str = ""
    password: str = Field(default="", repr=False)
    ca: FilePath | None = None
    tag_ttl: Duration = 0.0
    connect_timeout: Duration = 10.0
    read_timeout: Duration = 60.0
    # Docker Hub serves one-component names ("alpine") as "library/alpine".
    library_prefix: StrictBool | None = None
    # Token realm hosts, besides the upstream's own, that may receive username/password
    # (Docker Hub's auth.docker.io is allowed for registry-1.docker.io without saying so).
    token_realms: list[str] = Field(default_factory=list)

    @field_validator("ca", mode="before")
    @classmethod
    def _empty_ca_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")

    @property
    def adds_library_prefix(self) -> bool:
        if self.library_prefix is not None:
            return self.library_prefix
        return self.cache_prefix == "docker.io"  # lowercase: host names ignore case

    @property
    def cache_prefix(self) -> str:
        """The first component of its repositories' cache names (all but the first
        upstream's): its name, or `host_port` for `host:port`. registry:2's storage refuses a
        ":" in a path (its catalog and garbage-collect then fail on the whole cache), and
        reads the folder as a repository name's component: lowercase (else `_catalog` lists a
        name the mirror refuses)."""
        host, colon, port = self.name.lower().partition(":")
        return f"{host}_{port}" if colon else host


class CacheConfig(_Model):
    """`[mirror.cache]`: the limits the cache keeps itself within (none by default)."""

    max_size: Size | None = None  # past this, the least recently pulled content goes
    # Less free than this on the cache's file system: the least recently pulled content goes
    # (nginx's proxy_cache_path min_free).
    min_free: Size | None = None
    max_age: Duration | None = None  # content not pulled for this long goes
    interval: Annotated[Duration, Field(gt=0)] = 60.0  # how often the limits are applied

    @property
    def limited(self) -> bool:
        return any(limit is not None for limit in (self.max_size, self.min_free, self.max_age))


class AuthConfig(_Model):
    """`[mirror.auth]`: clients must authenticate, as htpasswd users (bcrypt entries)."""

    htpasswd: FilePath
    service: ChallengeService = "edgeproxy"  # the challenge's `service`, the tokens' audience
    realm: ChallengeRealm = ""  # the token URL clients are sent to; empty: <scheme>://<Host>/token
    token_ttl: Duration = 300.0
    anonymous: list[str] = Field(default_factory=list)  # repository globs anyone may pull
    anonymous_upstreams: list[str] = Field(default_factory=list)  # upstreams anyone may pull


class MirrorConfig(_Model):
    """The registry part: what registry:2's config.yml said."""

    root: FilePath = Path("/var/lib/edgeproxy")
    listen: Address | None = None
    headers: dict[HeaderName, HeaderValue] = Field(
        default_factory=lambda: {"X-Content-Type-Options": "nosniff"}
    )
    upstream: list[UpstreamConfig] = Field(min_length=1)
    cache: CacheConfig = CacheConfig()
    auth: AuthConfig | None = None

    @field_validator("upstream")
    @classmethod
    def _unique_names(cls, upstreams: list[UpstreamConfig]) -> list[UpstreamConfig]:
        names = [u.name for u in upstreams]
        names += [u.cache_prefix for u in upstreams if u.cache_prefix != u.name]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"upstream names must be unique; repeated: {', '.join(duplicates)}")
        return upstreams

    @model_validator(mode="after")
    def _anonymous_upstreams_exist(self) -> MirrorConfig:
        names = {u.name for u in self.upstream}
        wanted = self.auth.anonymous_upstreams if self.auth else []
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ValueError(f"auth.anonymous_upstreams: no such upstream: {', '.join(unknown)}")
        return self


class TlsConfig(_Model):
    """`[edge.tls]`: nginx's ssl_certificate (with its chain) and ssl_certificate_key."""

    certificate: FilePath
    key: FilePath


class GzipConfig(_Model):
    """`[edge.gzip]`: the seed's gzip block (level 6, min_length 256, its gzip_types)."""

    enabled: StrictBool = True  # the seed: gzip on


class EdgeConfig(_Model):
    """The nginx part: what the seed's nginx.conf and mirror.conf said.

    Defaults are the seed's values, so `[edge]` with listeners and a certificate is the seed.
    """

    http: Address | None = None
    https: Address | None = None
    server_name: str = ""
    backend: Backend = "embedded"
    connect_timeout: Duration = 300.0
    read_timeout: Duration = 300.0
    keepalive_timeout: Duration = 120.0
    client_header_timeout: Duration = 60.0  # nginx's default: the head must arrive in this time
    client_body_timeout: Duration = 60.0  # nginx's default: between two reads of a body
    send_timeout: Duration = 60.0  # nginx's default: between two writes of an answer
    client_max_body_size: Size = 1024 << 20
    access_log: Annotated[str, BeforeValidator(_no_nul)] = "-"  # a file, "-" (stdout) or "off"
    access_log_format: Literal["main", "json"] = "main"
    tls: TlsConfig | None = None
    gzip: GzipConfig = GzipConfig()
    workers: Workers = "auto"  # worker_processes: "auto" is one per CPU
    shutdown_timeout: Duration = SHUTDOWN_TIMEOUT  # a drain lets in-flight requests run this long

    @model_validator(mode="after")
    def _listeners_match_tls(self) -> EdgeConfig:
        if self.http is None and self.https is None:
            raise ValueError("set http or https (or both): the edge needs a listener")
        if self.https is not None and self.tls is None:
            raise ValueError("https needs [edge.tls] with certificate and key")
        if self.tls is not None and self.https is None:
            raise ValueError('[edge.tls] is set but https is not: set https = "host:port"')
        return self

    @property
    def embedded(self) -> bool:
        return self.backend == "embedded"

    @property
    def backend_url(self) -> str:
        return self.backend.rstrip("/")


class MetricsConfig(_Model):
    """`[metrics]`: registry:2's debug listener: Prometheus `/metrics` and `/debug/health`."""

    listen: Address


class HealthConfig(_Model):
    """`[health]`: registry:2's `health.storagedriver` (a storage probe every `interval`;
    `threshold` failures in a row → 503) and an upstream reachability check (degraded only)."""

    interval: Duration = Field(default=10.0, gt=0)
    threshold: StrictInt = Field(default=3, ge=1)
    timeout: Duration = Field(default=5.0, gt=0)  # one probe, storage or upstream


class Config(_Model):
    mirror: MirrorConfig
    edge: EdgeConfig | None = None
    metrics: MetricsConfig | None = None
    health: HealthConfig = HealthConfig()

    @property
    def worker_count(self) -> int:
        """How many processes serve the listeners (`[edge] workers`; "auto" without [edge])."""
        workers = self.edge.workers if self.edge is not None else "auto"
        return (os.cpu_count() or 1) if workers == "auto" else workers

    @property
    def shutdown_timeout(self) -> float:
        """How long a draining worker lets in-flight requests finish (`[edge] shutdown_timeout`)."""
        return self.edge.shutdown_timeout if self.edge is not None else SHUTDOWN_TIMEOUT


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


def find_config(path: Path | None) -> Path:
    if path is not None:
        return path
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_CONFIG_PATHS[0]


def load_config(path: Path) -> Config:
    """Read and validate `path`; relative paths in it are taken from the file's folder."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte {exc.start}), as TOML must be") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc)) from exc
    return _resolve_paths(config, path.parent)


def _describe(path: Path, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "list_type" and isinstance(error["input"], dict):
            message = f"a table where a list is wanted (write [[{key}]] for each entry)"
        lines.append(f"{path}: {key}: {message}")
    return "\n".join(lines)


def _resolve_paths(config: Config, base: Path) -> Config:
    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    upstreams = [
        u.model_copy(update={"ca": absolute(u.ca)}) if u.ca else u for u in config.mirror.upstream
    ]
    auth = config.mirror.auth
    if auth is not None:
        auth = auth.model_copy(update={"htpasswd": absolute(auth.htpasswd)})
    mirror = config.mirror.model_copy(
        update={"root": absolute(config.mirror.root), "upstream": upstreams, "auth": auth}
    )
    edge = config.edge
    if edge is not None:
        update: dict[str, Any] = {}
        if edge.tls is not None:
            update["tls"] = TlsConfig(
                certificate=absolute(edge.tls.certificate), key=absolute(edge.tls.key)
            )
        if edge.access_log not in ("-", "off"):
            update["access_log"] = str(absolute(Path(edge.access_log)))
        edge = edge.model_copy(update=update)
    return config.model_copy(update={"mirror": mirror, "edge": edge})


def config_from_dict(data: dict[str, Any], base: Path = Path(".")) -> Config:
    """Build a config from a dict (tests, tools), with the same validation as a file."""
    return _resolve_paths(Config.model_validate(data), base)

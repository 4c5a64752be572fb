"""The real registry (Debian's docker-registry, distribution 2.8) as a test upstream or mirror."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import free_port, http_status
from tests.support.tokenserver import TokenServer

REGISTRY_BINARY = "docker-registry"
HTPASSWD_BINARY = "htpasswd"
TEST_USER = "tester"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

# Apache combined format, as gorilla/handlers writes it for `log.accesslog`.
_ACCESS_LINE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>\S+) (?P<uri>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<size>\d+|-) '
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<user_agent>(?:[^"\\]|\\.)*)"$'
)

_live: list[Registry] = []


@dataclass(frozen=True)
class AccessEntry:
    """One line of the registry's access log."""

    remote: str
    user: str
    time: str
    method: str
    uri: str  # as requested, with the query string
    status: int
    size: int
    user_agent: str

    @property
    def path(self) -> str:
        """The URI without its query string."""
        return self.uri.partition("?")[0]


@dataclass(eq=False)
class Registry:
    """A registry:2 process with its config, storage and captured log in `workdir`."""

    mode: str  # "none" | "htpasswd" | "token": the registry's own auth
    port: int
    root: Path  # storage rootdirectory
    workdir: Path  # config.yml, registry.log, auth files
    username: str | None = None  # htpasswd/token: a user allowed to pull and push
    password: str | None = None
    remote: str | None = None  # proxy mode: proxy.remoteurl
    token_server: TokenServer | None = None  # mode "token": the realm
    tls: bool = False  # https with http.tls's certificate (its CA is the certificate itself)
    address: str = "127.0.0.1"  # or "::1"
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The registry's base URL."""
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def host(self) -> str:
        """host:port, as used in image references (skopeo takes no IPv6 address there)."""
        address = f"[{self.address}]" if ":" in self.address else self.address
        return f"{address}:{self.port}"

    @property
    def creds(self) -> tuple[str, str] | None:
        """(username, password) of the push-capable user, if the registry has one."""
        if self.username is None or self.password is None:
            return None
        return self.username, self.password

    @property
    def config_path(self) -> Path:
        """The registry's config.yml."""
        return self.workdir / "config.yml"

    @property
    def log_path(self) -> Path:
        """The process's stdout and stderr, appended across restarts."""
        return self.workdir / "registry.log"

    def start(self) -> None:
        """Start the process and wait until `GET /v2/` answers; raise with the log tail if not."""
        if self._process is not None:
            raise RuntimeError(f"registry on {self.host} already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [_require(REGISTRY_BINARY), "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        _live.append(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the process group (SIGTERM, then SIGKILL) and wait; storage is kept."""
        process, self._process = self._process, None
        if self in _live:
            _live.remove(self)
        if process is None:
            return
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()

    def close(self) -> None:
        """Stop the registry and its token server for good."""
        self.stop()
        if self.token_server is not None:
            self.token_server.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the process wrote."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def access_log(self) -> list[AccessEntry]:
        """The requests the registry logged so far (all runs of this instance)."""
        if not self.log_path.exists():
            return []
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = _ACCESS_LINE.match(line)
            if match:
                entries.append(
                    AccessEntry(
                        remote=match["remote"],
                        user=match["user"],
                        time=match["time"],
                        method=match["method"],
                        uri=match["uri"],
                        status=int(match["status"]),
                        size=0 if match["size"] == "-" else int(match["size"]),
                        user_agent=match["user_agent"],
                    )
                )
        return entries

    def count(self, method: str, path_suffix: str) -> int:
        """How many logged requests had this method and a path ending in `path_suffix`."""
        return sum(
            1 for e in self.access_log() if e.method == method and e.path.endswith(path_suffix)
        )

    def wait_count(self, method: str, path_suffix: str, expected: int, timeout: float = 5.0) -> int:
        """`count()`, polled until it reaches `expected`: a log line trails its response a bit."""
        deadline = time.monotonic() + timeout
        while (n := self.count(method, path_suffix)) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return n

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"registry on {self.host} exited with {self._process.returncode}:\n"
                    f"{self.log_tail()}"
                )
            if http_status(f"{self.url}/v2/", verify=False) in (200, 401):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"registry on {self.host} not ready after {START_TIMEOUT} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)


def start_registry(
    workdir: Path,
    mode: str = "none",
    remote: str | None = None,
    remote_username: str | None = None,
    remote_password: str | None = None,
    *,
    token_expires_in: int = 300,
    tls: tuple[Path, Path] | None = None,
    address: str = "127.0.0.1",
    storage: Path | None = None,
) -> Registry:
    """Configure and start a registry in `workdir`: auth `mode` (a "token" one's server at
    `address` too when IPv4, else at 127.0.0.1), a mirror of `remote` if given,
    https with `tls` = (certificate, key) if given, listening on `address` ("::1": IPv6),
    keeping its blobs in `storage` (another registry's `root`, say) or its own folder.

    In proxy mode registry:2 panics at start when `remote` is unreachable: start it first.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    registry = Registry(
        mode=mode,
        port=free_port(),
        root=storage or workdir / "storage",
        workdir=workdir,
        address=address,
    )
    config: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(registry.root)},
            "cache": {"blobdescriptor": "inmemory"},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": registry.host,
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if mode == "htpasswd":
        registry.username, registry.password = TEST_USER, secrets.token_urlsafe(12)
        htpasswd = workdir / "htpasswd"
        entry = subprocess.run(
            [_require(HTPASSWD_BINARY), "-Bbn", registry.username, registry.password],
            check=True,
            capture_output=True,
        ).stdout
        htpasswd.write_bytes(entry.strip() + b"\n")
        config["auth"] = {"htpasswd": {"realm": "edgeproxy-test", "path": str(htpasswd)}}
    elif mode == "token":
        registry.username, registry.password = TEST_USER, secrets.token_urlsafe(12)
        token_server = TokenServer(
            workdir,
            {registry.username: registry.password},
            expires_in=token_expires_in,
            address=address if ":" not in address else "127.0.0.1",
        )
        registry.token_server = token_server
        config["auth"] = {
            "token": {
                "realm": token_server.realm,
                "service": token_server.service,
                "issuer": token_server.issuer,
                "rootcertbundle": str(token_server.rootcertbundle),
            }
        }
    elif mode != "none":
        raise ValueError(f"unknown registry mode {mode!r}")
    if tls is not None:
        registry.tls = True
        http = config["http"]
        assert isinstance(http, dict)
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    if remote is not None:
        registry.remote = remote
        proxy = {"remoteurl": remote}
        if remote_username is not None:
            proxy |= {"username": remote_username, "password": remote_password or ""}
        config["proxy"] = proxy
    # JSON is YAML: no YAML library needed.
    registry.config_path.write_text(json.dumps(config, indent=2) + "\n")
    try:
        registry.start()
    except BaseException:
        registry.close()
        raise
    return registry


def garbage_collect(root: Path, *flags: str) -> str:
    """`registry garbage-collect` (registry:2's own GC, `--delete-untagged` a flag) on a
    storage root; its output. Raises with the output when it fails."""
    config = root.parent / f"{root.name}-gc.yml"
    storage = {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}}
    config.write_text(json.dumps({"version": "0.1", "storage": storage}) + "\n")
    done = subprocess.run(
        [_require(REGISTRY_BINARY), "garbage-collect", str(config), *flags],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"garbage-collect failed:\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} not found: install it (scripts/install --test)")
    return path


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@atexit.register
def _stop_all() -> None:
    for registry in list(_live):
        registry.stop()

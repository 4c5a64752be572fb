"""The error log: nginx's line shape and levels, and no credential or token in it, after pulls
from upstreams with htpasswd (Basic) and bearer-token auth, and after a failing request."""

from __future__ import annotations

import base64
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeproxy.logs import ErrorLogFormatter, RequestLog, redact
from edgeproxy.mirror.cache_status import HIT
from tests.support.images import Pushed
from tests.support.ports import free_port
from tests.support.registry import Registry
from tests.support.servers import EdgeproxyProcess, serve_app, write_toml
from tests.support.skopeo import skopeo

LINE = re.compile(
    r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(debug|info|notice|warn|error|crit)\] \d+#0: \S+: "
)


def test_no_credential_or_token_is_logged(
    registry_htpasswd: Registry,
    registry_token: Registry,
    push_all: Callable[[Registry], dict[str, Pushed]],
    tmp_path: Path,
) -> None:
    secrets: list[str] = []
    upstreams = []
    for name, registry in (("docker.io", registry_htpasswd), ("tokens.test", registry_token)):
        assert registry.creds is not None
        user, password = registry.creds
        upstreams.append(
            {"name": name, "url": registry.url, "username": user, "password": password}
        )
        secrets += [password, base64.b64encode(f"{user}:{password}".encode()).decode()]
    items = {
        "docker.io": push_all(registry_htpasswd)["small"],
        "tokens.test": push_all(registry_token)["small"],
    }
    assert registry_token.token_server is not None
    tokens_before = registry_token.token_server.token_requests
    port = free_port()
    config = {
        "mirror": {"root": str(tmp_path / "cache"), "listen": f"127.0.0.1:{port}",
                   "upstream": upstreams},
        "edge": {"http": f"127.0.0.1:{free_port()}", "workers": 2},
    }  # fmt: skip
    process = EdgeproxyProcess(write_toml(tmp_path / "proxy.toml", config), port)
    process.start()
    try:
        for prefix, item in (("", items["docker.io"]), ("tokens.test/", items["tokens.test"])):
            skopeo(
                "copy", "--src-tls-verify=false", "--src-no-creds",
                f"docker://{process.host}/{prefix}{item.repo}:{item.tag}",
                f"oci:{tmp_path / prefix.strip('/')}-pull:v1",
            )  # fmt: skip
        # A client's own credentials on a request the mirror refuses, and an unknown tag.
        headers = {"Authorization": f"Bearer eyJclient.{secrets[0]}"}
        httpx.put(f"{process.url}/v2/test/small/manifests/x", headers=headers, content=b"{}")
        assert httpx.get(f"{process.url}/v2/test/small/manifests/nope").status_code == 404
    finally:
        process.stop()
    log = process.log()
    assert "cached sha256:" in log  # the pulls happened and were logged
    assert registry_token.token_server.token_requests > tokens_before  # a token was used
    for secret in secrets:
        assert secret not in log
    assert "eyJ" not in log  # the start of every JWT: no bearer token was written
    lines = log.splitlines()
    assert lines and all(LINE.match(line) for line in lines), [
        line for line in lines if not LINE.match(line)
    ]


def test_redact_catches_what_looks_like_a_credential() -> None:
    assert redact("GET https://bob:hunter2@host/v2/") == "GET https://[redacted]@host/v2/"
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer [redacted]"
    assert redact("AUTHORIZATION: BEARER abc.def") == "AUTHORIZATION: BEARER [redacted]"
    assert redact("/token?PASSWORD=x") == "/token?PASSWORD=[redacted]"
    assert redact("{'authorization': 'Basic Ym9i'}") == "{'authorization': 'Basic [redacted]'}"
    assert redact("/token?service=x&access_token=abc") == "/token?service=x&access_token=[redacted]"
    assert redact("the key is hunter2!", ["hunter2"]) == "the key is [redacted]!"
    # Not credentials: a challenge's parameters, an address.
    assert redact('Bearer realm="http://h/token"') == 'Bearer realm="http://h/token"'
    assert redact("listening on http://127.0.0.1:5000") == "listening on http://127.0.0.1:5000"


def test_a_traceback_stays_on_its_line() -> None:
    formatter = ErrorLogFormatter()
    try:
        raise ValueError("two\nlines")
    except ValueError:
        record = logging.LogRecord("edgeproxy", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line
    assert LINE.match(line) and "[error]" in line and "ValueError: two\\nlines" in line


def test_what_a_client_sent_never_shapes_the_log() -> None:
    """A request's path is logged decoded: %0d or %1b in it reach a message as a carriage
    return (a forged line over the real one, on a terminal or in `less`) or a terminal's escape
    sequence. Every character that does not print is written as its escape, as nginx writes
    the request line as it came, percent-encoded."""
    formatter = ErrorLogFormatter()
    path = "/v2/a\r2026/01/01 00:00:00 [crit] 1#0: forged\x1b[2K\x85\u2028\x00/manifests/x"
    record = logging.LogRecord(
        "edgeproxy.mirror", logging.INFO, __file__, 1, "GET %s", (path,), None
    )
    line = formatter.format(record)
    assert line.isprintable(), line
    assert LINE.match(line)
    assert line.endswith(
        "GET /v2/a\\r2026/01/01 00:00:00 [crit] 1#0: forged\\x1b[2K\\x85\\u2028\\x00/manifests/x"
    )


def test_a_line_names_its_process_and_its_second_after_a_fork() -> None:
    """The pid is kept once per process (workers are forked) and the time formatted once a
    second: neither may be a parent's, nor a second's before."""
    formatter = ErrorLogFormatter()

    def line(created: float) -> str:
        record = logging.LogRecord("edgeproxy", logging.INFO, __file__, 1, "x", (), None)
        record.created = created
        return formatter.format(record)

    first = line(1_800_000_000.0)
    assert line(1_800_000_000.9).split(" [")[0] == first.split(" [")[0]
    assert line(1_800_000_001.0).split(" [")[0] != first.split(" [")[0]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover  # the child reports its line and its pid, then leaves
        os.write(write, f"{os.getpid()} {line(1_800_000_000.0)}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        pid, child_line = pipe.read().split(" ", 1)
    os.waitpid(child, 0)
    assert f" {os.getpid()}#0: " in first
    assert int(pid) == child and f" {child}#0: " in child_line


def test_a_request_line_per_request_once_answered(caplog: pytest.LogCaptureFixture) -> None:
    """The client, the request line as sent, status, body bytes, seconds, the cache's state
    and the User-Agent; an app that fails is logged 500, as uvicorn answers it."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/fails":
            raise RuntimeError("failed")
        headers = [(b"content-length", b"5"), (b"cache-status", HIT.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ab", "more_body": True})
        await send({"type": "http.response.body", "body": b"cde"})

    caplog.set_level(logging.INFO, "edgeproxy.requests")
    with (
        serve_app(RequestLog(app), lifespan="off") as url,
        httpx.Client(base_url=url, headers={"User-Agent": 'ua "1"'}) as client,
    ):
        assert client.get("/v2/x/blobs/sha256:ab%41?ns=docker.io").content == b"abcde"
        assert client.get("/fails").status_code == 500
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeproxy.requests"]
    pattern = r'127\.0\.0\.1:\d+ "GET {} HTTP/1\.1" {} {} \d+\.\d{{3}} {} "ua \\x221\\x22"'
    assert re.fullmatch(
        pattern.format(re.escape("/v2/x/blobs/sha256:ab%41?ns=docker.io"), 200, 5, "HIT"), lines[0]
    ), lines[0]
    assert re.fullmatch(pattern.format("/fails", 500, 0, "-"), lines[1]), lines[1]

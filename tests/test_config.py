import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from edgeproxy.cli import main
from edgeproxy.config import ConfigError, load_config, parse_address, parse_duration, parse_size
from edgeproxy.edge.certs import self_signed
from tests.support.servers import WITHOUT_DAC, write_toml

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0s", 0), ("300s", 300), ("300", 300), ("1h30m", 5400), ("250ms", 0.25), ("168h", 604800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024m", 1 << 30), ("200GiB", 200 << 30), ("10MB", 10_000_000), ("32k", 32768), (7, 7)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["5 minutes", "-1s", "s", "", math.inf, math.nan, "9" * 400])
def test_bad_durations(bad: str | float) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["9" * 400 + "m", "1" + "0" * 310, "-1", "lots"])
def test_bad_sizes(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


MIRROR = '[mirror]\nlisten = "127.0.0.1:5000"\n[[mirror.upstream]]\nname = "docker.io"\n'
MIRROR += 'url = "https://r.example"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Each passed `check`, then failed `run` or a reload; some took the master down.
        ("[edge]\nhttp = ':8080'\nshutdown_timeout = inf\n", "edge.shutdown_timeout: not a"),
        ("[mirror.cache]\nmax_age = nan\n", "mirror.cache.max_age: not a duration"),
        (f"[mirror.cache]\nmax_size = '{'9' * 400}m'\n", "mirror.cache.max_size: not a size"),
        (f"[mirror.cache]\nmin_free = '{'9' * 400}m'\n", "mirror.cache.min_free: not a size"),
        ("[mirror.cache]\nmin_free = '-1g'\n", "mirror.cache.min_free: not a size"),
        ("[mirror.cache]\nmin_free = '10GiB'\n", ""),
        ("[mirror.cache]\n", ""),  # the baseline: ok
    ],
)
def test_check_refuses_numbers_run_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MIRROR + text)
    assert main(["check", "--config", str(path)]) == (1 if message else 0)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            MIRROR.replace("[[mirror", 'root = "a\\u0000b"\n[[mirror'),
            "mirror.root: contains a NUL byte",
        ),
        (
            MIRROR.replace("[[mirror", 'headers = { X-A = "a\\r\\nSet-Cookie: x=1" }\n[[mirror'),
            "mirror.headers.X-A: not an HTTP header value",
        ),
        (
            MIRROR.replace("[[mirror", "headers = { 'X A' = 'a' }\n[[mirror"),
            "mirror.headers.X A.[key]: not an HTTP header name",
        ),
        (
            MIRROR.replace("[[mirror", "headers = { Content-Length = '0' }\n[[mirror"),
            "mirror.headers.Content-Length.[key]: Content-Length is the server's to set",
        ),
        (
            MIRROR.replace('listen = "127.0.0.1:5000"\n', ""),
            "nothing to listen on: set mirror.listen or [edge]",
        ),
        (
            MIRROR + "[metrics]\nlisten = '127.0.0.1:5000'\n",
            "mirror.listen and metrics.listen both want port 5000 of 127.0.0.1",
        ),
        (
            MIRROR + "[edge]\nhttp = '0.0.0.0:5000'\n",
            "mirror.listen and edge.http both want port 5000 of 0.0.0.0",
        ),
        (MIRROR + "[edge]\nhttp = '[::]:5000'\n", "both want port 5000 of ::"),
        (MIRROR + "[metrics]\nlisten = '[::1]:5000'\n", ""),  # binds beside 127.0.0.1:5000
        (
            MIRROR.replace("127.0.0.1", "0.0.0.0") + "[metrics]\nlisten = '[::1]:5000'\n",
            "",  # 0.0.0.0 takes IPv4 only
        ),
    ],
)
def test_check_refuses_what_run_cannot_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    """A path with a NUL, a header that would fail or misframe every response, no listener,
    one port wanted twice: `check` (ExecStartPre, ExecReload) says so, as `nginx -t` would;
    listeners that bind side by side pass."""
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    assert main(["check", "--config", str(path)]) == (1 if message else 0)
    assert message in capsys.readouterr().err


def test_check_names_a_key_it_may_not_read(tmp_path: Path) -> None:
    """A key only its owner may read (certbot's are root's; the service is not): `check`
    names it, as nginx -t does. Run as root without the power to read anyone's files."""
    self_signed(["127.0.0.1"], tmp_path)
    os.chown(tmp_path / "server.key", 65534, 65534)
    (tmp_path / "server.key").chmod(0o600)
    path = tmp_path / "proxy.toml"
    path.write_text(
        MIRROR
        + "[edge]\nhttps = ':8443'\n[edge.tls]\ncertificate = 'server.crt'\nkey = 'server.key'\n"
    )
    done = subprocess.run(
        [*WITHOUT_DAC, sys.executable, "-m", "edgeproxy.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "edge.tls: " in done.stderr and "cannot read: Permission denied" in done.stderr
    assert "Traceback" not in done.stderr


def test_addresses() -> None:
    assert parse_address("0.0.0.0:5000") == ("0.0.0.0", 5000)
    assert parse_address(":80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:443") == ("::1", 443)
    with pytest.raises(ValueError):
        parse_address("localhost")


def test_shipped_config_is_valid() -> None:
    config = load_config(ROOT / "proxy.toml")
    assert config.mirror.upstream[0].name == "docker.io"
    assert config.mirror.upstream[0].adds_library_prefix
    assert config.mirror.root.is_absolute()


def test_errors_name_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        '[mirror]\nlisten = "nowhere"\n[[mirror.upstream]]\nname = "x"\n'
        'url = "http://127.0.0.1:1"\ntag_ttl = "soon"\nbogus = 1\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"{path}: mirror.listen: not an address" in message
    assert f"{path}: mirror.upstream.0.tag_ttl: not a duration" in message
    assert f"{path}: mirror.upstream.0.bogus: unknown key" in message


def test_a_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Latin-1 byte in a comment: a message, not a traceback (a reload keeps the old config)."""
    path = tmp_path / "proxy.toml"
    path.write_bytes(b"# caf\xe9\n[mirror]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
    assert main(["check", "--config", str(path)]) == 1
    assert f"{path}: not UTF-8 (byte 5)" in capsys.readouterr().err


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(ROOT / "proxy.toml")]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[mirror]\n")
    assert main(["check", "--config", str(bad)]) == 1
    assert "mirror.upstream: Field required" in capsys.readouterr().err


def test_check_refuses_an_encrypted_key_without_asking_for_its_passphrase(tmp_path: Path) -> None:
    """OpenSSL would ask for the passphrase on the terminal (a master reloading in one would
    wait there) or fail with EINVAL: "cannot read: Invalid argument" named no cause."""
    _, key = self_signed(["127.0.0.1"], tmp_path)
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    path = tmp_path / "proxy.toml"
    path.write_text(
        MIRROR
        + "[edge]\nhttps = ':8443'\n[edge.tls]\ncertificate = 'server.crt'\nkey = 'server.key'\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "edgeproxy.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    assert f"edge.tls: {key}: the key is encrypted" in done.stderr, done.stderr
    assert "pass phrase" not in done.stderr


def test_check_loads_the_files_the_config_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `nginx -t` loads its certificates and opens its logs: a valid config naming a file
    that will not load fails `check` (the unit's ExecStartPre and ExecReload), naming the key
    and the file."""
    upstream = {"name": "docker.io", "url": "https://r.example"}
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = tmp_path / "missing.crt"
    tls = {"certificate": str(missing), "key": str(garbage)}
    cases: list[tuple[dict[str, Any], dict[str, Any] | None, str]] = [
        ({}, {"https": "127.0.0.1:8443", "tls": tls}, f"edge.tls: {missing}: no such file"),
        (
            {},
            {"http": "127.0.0.1:8080", "access_log": str(missing / "access.log")},
            f"edge.access_log: cannot open {missing}/access.log: No such file or directory",
        ),
        ({"auth": {"htpasswd": str(missing)}}, None, f"auth.htpasswd: cannot read {missing}"),
        (
            {"upstream": [{**upstream, "ca": str(garbage)}]},
            None,
            f"mirror.upstream.0.ca: cannot load {garbage}",
        ),
    ]
    for mirror, edge, message in cases:
        config: dict[str, Any] = {
            "mirror": {"root": str(tmp_path / "cache"), "upstream": [upstream], **mirror}
        }
        if edge is not None:
            config["edge"] = edge
        else:
            config["mirror"]["listen"] = "127.0.0.1:5000"
        path = write_toml(tmp_path / "proxy.toml", config)
        assert main(["check", "--config", str(path)]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"edgeproxy: {path}: ") and message in error, error


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        # The blob threads speak to http:// and https:// proxies only.
        ("https_proxy", "socks5://127.0.0.1:1080", "HTTPS_PROXY: socks5:// proxies are not "
         "supported (use http:// or https://)"),
        ("HTTP_PROXY", "https://127.0.0.1:99999", "HTTP_PROXY: the proxy's port is not a number "
         "from 0 to 65535"),
    ],
)  # fmt: skip
def test_check_refuses_a_proxy_variable_run_cannot_use(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    message: str,
) -> None:
    mirror = {"listen": "127.0.0.1:5000", "upstream": [{"name": "docker.io", "url": "https://r"}]}
    path = write_toml(tmp_path / "proxy.toml", {"mirror": mirror})
    monkeypatch.setenv(variable, value)
    assert main(["check", "--config", str(path)]) == 1
    assert capsys.readouterr().err == f"edgeproxy: {path}: the environment's {message}\n"


def test_check_takes_an_https_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY=https://... (TLS with the proxy, as Go takes it) was refused: "https://
    proxies are not supported (use http://)"."""
    mirror = {"listen": "127.0.0.1:5000", "upstream": [{"name": "docker.io", "url": "https://r"}]}
    path = write_toml(tmp_path / "proxy.toml", {"mirror": mirror})
    monkeypatch.setenv("HTTPS_PROXY", "https://proxy.example:3129")
    assert main(["check", "--config", str(path)]) == 0, capsys.readouterr().err


def test_check_as_root_makes_no_access_log_the_service_cannot_open(tmp_path: Path) -> None:
    """`sudo edgeproxy check` (as one runs `sudo nginx -t`) made a missing access log, owned
    by root: the service (User=edgeproxy) then failed its ExecStartPre and every reload with
    "cannot open ...: Permission denied". check no longer makes it; a folder the log cannot be
    made in is still refused."""
    logs = tmp_path / "log"
    logs.mkdir()
    os.chown(logs, 65534, 65534)
    mirror = {"root": str(tmp_path / "cache"), "upstream": [{"name": "x", "url": "http://x"}]}
    edge = {"http": "127.0.0.1:8080", "access_log": str(logs / "access.log")}
    path = str(write_toml(tmp_path / "proxy.toml", {"mirror": mirror, "edge": edge}))
    assert main(["check", "--config", path]) == 0
    assert not (logs / "access.log").exists()
    logs.chmod(0o755)
    command = [sys.executable, "-m", "edgeproxy.cli", "check", "--config", path]
    done = subprocess.run([*WITHOUT_DAC, *command], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"edge.access_log: cannot open {logs}/access.log: Permission denied" in done.stderr


def test_check_warns_of_credentials_anyone_may_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid, so exit 0, but `check` says what `run` logs as [warn]: the upstream's
    credentials serve whoever reaches a mirror without [mirror.auth]."""
    upstream = {"name": "docker.io", "url": "https://r.example", "username": "u", "password": "p"}
    mirror = {"listen": "127.0.0.1:5000", "upstream": [upstream]}
    path = write_toml(tmp_path / "proxy.toml", {"mirror": mirror})
    assert main(["check", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok\n"
    assert captured.err == (
        f"edgeproxy: {path}: warning: upstream docker.io has credentials and [mirror.auth] is "
        "not set: whoever reaches the mirror may pull what they can\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[edge.gzip]\nenabled = "yes"', "edge.gzip.enabled: Input should be a valid boolean"),
        ("[health]\nthreshold = 3.0", "health.threshold: Input should be a valid integer"),
        ('[health]\nthreshold = "3"', "health.threshold: Input should be a valid integer"),
        (
            '[edge]\nhttp = ":80"\nworkers = "many"',
            "edge.workers: 'many': use \"auto\" (one per CPU) or a number of processes, 1 to 256",
        ),
        (
            '[mirror.upstream]\nname = "docker.io"\nurl = "https://registry-1.docker.io"',
            "mirror.upstream: a table where a list is wanted (write [[mirror.upstream]]",
        ),
    ],
)
def test_errors_say_what_is_wanted(tmp_path: Path, text: str, expected: str) -> None:
    """A value of another type is refused (pydantic's lax mode took "yes" for true), and each
    message says what the key wants, never a regex or a union's inner names."""
    path = tmp_path / "proxy.toml"
    upstream = '[[mirror.upstream]]\nname = "docker.io"\nurl = "https://registry-1.docker.io"\n'
    mirror = "" if "mirror.upstream" in text else f'[mirror]\nroot = "cache"\n{upstream}'
    path.write_text(f"{mirror}{text}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}: {expected}" in str(caught.value)


def test_upstream_url_and_name_errors_say_what_is_wanted(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('[[mirror.upstream]]\nname = "a b"\nurl = "registry-1.docker.io"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "mirror.upstream.0.name: not a registry host name (e.g. docker.io" in message
    assert "mirror.upstream.0.url: not http(s)://host[:port] (no path, no user@" in message
    assert "pattern" not in message


@pytest.mark.parametrize(
    ("names", "repeated"),
    [
        (("Registry.Local:5000", "registry.local:5000"), r"registry\.local_5000"),
        (("Quay.IO", "quay.io"), r"quay\.io"),
    ],
)
def test_upstreams_cached_under_one_name_are_refused(
    tmp_path: Path, names: tuple[str, str], repeated: str
) -> None:
    """`host:port` is cached as `host_port` (registry:2 takes no ":" in a path), lowercase."""
    upstreams = [{"name": name, "url": "https://r.example"} for name in ("docker.io", *names)]
    path = write_toml(tmp_path / "proxy.toml", {"mirror": {"upstream": upstreams}})
    with pytest.raises(ConfigError, match=f"repeated: {repeated}"):
        load_config(path)


def test_no_config_anywhere_names_both_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        "edgeproxy.cli.DEFAULT_CONFIG_PATHS", (Path("proxy.toml"), tmp_path / "etc.toml")
    )
    monkeypatch.setattr(
        "edgeproxy.config.DEFAULT_CONFIG_PATHS", (Path("proxy.toml"), tmp_path / "etc.toml")
    )
    assert main(["check"]) == 1
    assert f"neither proxy.toml nor {tmp_path / 'etc.toml'} exists" in capsys.readouterr().err

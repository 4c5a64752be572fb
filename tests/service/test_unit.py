"""The systemd unit: `systemd-analyze verify` accepts it (no error, no warning), the shipped
copy is the rendered default, and `edgeproxy service install` fits it to the config."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.service.unit import render
from tests.support.servers import write_toml

CONTRIB = Path(__file__).parents[2] / "contrib/systemd/edgeproxy.service"
EDGEPROXY = Path(sys.executable).parent / "edgeproxy"  # the installed console script

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing (Debian's systemd package)",
)


def verify(unit: Path) -> str:
    """`systemd-analyze verify`'s complaints; it exits 0 on many of them, so all count."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    complaints = (result.stdout + result.stderr).strip()
    return complaints if result.returncode == 0 else f"{complaints} (exit {result.returncode})"


def test_the_shipped_unit_is_the_rendered_default() -> None:
    assert CONTRIB.read_text() == render()


def test_the_unit_says_what_the_issue_asks() -> None:
    lines = set(render().splitlines())
    for line in (
        "Type=notify",
        "ExecReload=/usr/local/bin/edgeproxy check --config /etc/edgeproxy/proxy.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=edgeproxy",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/edgeproxy -/var/log/edgeproxy",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "KillMode=mixed",
    ):
        assert line in lines


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_it(tmp_path: Path) -> None:
    unit = tmp_path / "edgeproxy.service"  # the shipped unit with this checkout's executable
    unit.write_text(CONTRIB.read_text().replace("/usr/local/bin/edgeproxy", str(EDGEPROXY)))
    assert verify(unit) == ""
    broken = tmp_path / "broken" / "edgeproxy.service"  # and it does complain when it should
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("Type=notify", "Type=notiffy"))
    assert "Failed to parse service type" in verify(broken)


@needs_systemd_analyze
def test_paths_with_spaces_and_percent_signs_stay_one_path(tmp_path: Path) -> None:
    """systemd splits words at spaces, reads `%x` as a specifier and `$p` as a variable: such
    paths are quoted and escaped, or `--config` would be two arguments (or another path) and
    ReadWritePaths two paths."""
    folders = {name: tmp_path / name for name in ("e $p", "my cache", "lo%g")}
    for folder in folders.values():
        folder.mkdir()
    unit = render(
        executable=EDGEPROXY,
        config=folders["e $p"] / "p%x.toml",
        root=folders["my cache"],
        log_dir=folders["lo%g"],
    )
    lines = unit.splitlines()
    assert f'ExecStart={EDGEPROXY} run --config "{tmp_path}/e $$p/p%%x.toml"' in lines
    assert f'ReadWritePaths="{tmp_path}/my cache" -{tmp_path}/lo%%g' in lines
    assert f"install -d -o edgeproxy -g edgeproxy '{tmp_path}/my cache' {tmp_path}/lo%g" in unit
    path = tmp_path / "edgeproxy.service"
    path.write_text(unit)
    assert verify(path) == ""


@needs_systemd_analyze
def test_service_install_writes_a_unit_for_the_config(tmp_path: Path) -> None:
    config = {
        "mirror": {
            "root": str(tmp_path / "cache"),
            "listen": "127.0.0.1:5000",
            "upstream": [{"name": "docker.io", "url": "http://127.0.0.1:1"}],
        },
        "edge": {
            "http": "127.0.0.1:8080",
            "access_log": str(tmp_path / "logs/access.log"),
            "shutdown_timeout": "120s",
        },
    }
    path = write_toml(tmp_path / "proxy.toml", config)
    result = subprocess.run(
        [str(EDGEPROXY), "service", "install", "--config", str(path), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    unit = tmp_path / "edgeproxy.service"
    assert result.stdout.strip() == str(unit)
    text = unit.read_text()
    assert f"ExecStart={EDGEPROXY} run --config {path}" in text
    assert f"ReadWritePaths={tmp_path / 'cache'} -{tmp_path / 'logs'}" in text
    assert "TimeoutStopSec=150s" in text
    assert verify(unit) == ""

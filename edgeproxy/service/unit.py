"""The systemd unit: `contrib/systemd/edgeproxy.service` is `render()` with its defaults, and
`edgeproxy service install` writes it with this installation's paths."""

from __future__ import annotations

import shlex
from pathlib import Path

from edgeproxy.config import SHUTDOWN_TIMEOUT

UNIT_NAME = "edgeproxy.service"

_TEMPLATE = """\
# edgeproxy: a Docker registry mirror with its own TLS edge (nginx + registry:2 in one).
# Install: edgeproxy service install (or copy this file to /etc/systemd/system/), then
#   useradd --system --home-dir {root_sh} --shell /usr/sbin/nologin {user}
#   install -d -o {user} -g {user} {root_sh} {log_dir_sh}
#   systemctl daemon-reload && systemctl enable --now edgeproxy
# Reload (config and certificates, no download dropped): systemctl reload edgeproxy
[Unit]
Description=edgeproxy registry mirror
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStartPre={executable} check --config {config}
ExecStart={executable} run --config {config}
# A config that fails the check (certificates included) fails `systemctl reload`; the
# running one stays, as after `nginx -s reload` with a broken nginx.conf.
ExecReload={executable} check --config {config}
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM to the master only: it drains the workers ([edge] shutdown_timeout), then exits 0.
KillMode=mixed
TimeoutStopSec={stop_timeout}
Restart=on-failure
RestartSec=2s
LimitNOFILE=65536

User={user}
Group={user}
# Ports 80 and 443 without root.
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={root} {optional_log_dir}
# The default folders, made and owned by systemd for {user} (another root: install -d it).
StateDirectory=edgeproxy
LogsDirectory=edgeproxy
PrivateTmp=yes
PrivateDevices=yes
ProtectHome=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def render(
    executable: Path = Path("/usr/local/bin/edgeproxy"),
    config: Path = Path("/etc/edgeproxy/proxy.toml"),
    root: Path = Path("/var/lib/edgeproxy"),
    log_dir: Path = Path("/var/log/edgeproxy"),
    user: str = "edgeproxy",
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
) -> str:
    """The unit for these paths (absolute: systemd takes no relative ones)."""
    return _TEMPLATE.format(
        executable=_word(str(executable.absolute()), command=True),
        config=_word(str(config.absolute()), command=True),
        root=_word(str(root.absolute())),
        optional_log_dir=_word(f"-{log_dir.absolute()}"),  # "-": ignored when missing
        root_sh=shlex.quote(str(root.absolute())),
        log_dir_sh=shlex.quote(str(log_dir.absolute())),
        user=user,
        stop_timeout=f"{round(shutdown_timeout) + 30}s",  # the drain, then time to exit
    )


def _word(text: str, command: bool = False) -> str:
    """`text` as one word of a unit's command line or path list: `%` would start a systemd
    specifier, `$` a variable in a command line, and a space, quote or backslash would split
    or escape it unless quoted."""
    text = text.replace("%", "%%")
    if command:
        text = text.replace("$", "$$")
    if any(c in text for c in " \t\"'\\"):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def install(unit_dir: Path, unit: str) -> Path:
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    path.write_text(unit)
    return path

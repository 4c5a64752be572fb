"""A throwaway systemd: Debian's, as PID 1 of a systemd-nspawn container, booting one unit.

The container's root is a tmpfs holding the host's /usr read-only (`--volatile=yes`), so
nothing it writes reaches the host except the folders bound into it. It has a network of its
own (loopback only), read-only /proc/sys and /sys, and boots only what its unit needs
(sysinit, basic): not the first-boot wizard, sysctl, sysusers or network configuration.
The unit should power the container off when done (`SuccessAction=`/`FailureAction=`).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

# Units a booted host would run that a test container must not (or cannot) run.
MASKED = (
    "systemd-sysctl.service",
    "systemd-sysusers.service",
    "systemd-networkd.service",
    "systemd-networkd-wait-online.service",
    "nftables.service",
)


def nspawn_missing() -> str | None:
    """Why a container cannot be booted here, or None."""
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is missing (Debian's systemd-container; scripts/install --test)"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is missing"
    return None


def boot(
    unit: str, files: Mapping[str, Path], folders: Sequence[Path], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Boot a container to `unit` and wait until it powers off. `files` maps paths in the
    container to host files bound read-only (units, /etc/passwd...); `folders` are bound
    read-write at the same path. Returns nspawn's result, its output the boot's console."""
    command = [
        "systemd-nspawn", "--quiet", "--directory=/", "--volatile=yes", "--private-network",
        "--register=no", "--keep-unit", f"--machine=edgeproxy-{secrets.token_hex(4)}",
        *(f"--bind={folder}" for folder in folders),
        *(f"--bind-ro={host}:{inside}" for inside, host in files.items()),
        "--boot", f"systemd.unit={unit}", "systemd.firstboot=off",
        *(f"systemd.mask={masked}" for masked in MASKED),
    ]  # fmt: skip
    return subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )

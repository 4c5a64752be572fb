"""htpasswd files as Debian's `htpasswd -B` (apache2-utils) writes them."""

from __future__ import annotations

import shutil
import subprocess


def htpasswd_entry(user: str, password: str, *, flag: str = "-B") -> bytes:
    """One `user:hash` line; `flag` "-B" is bcrypt, "-m" Apache's MD5."""
    binary = shutil.which("htpasswd")
    if binary is None:
        raise RuntimeError("htpasswd not found: install apache2-utils (scripts/install --test)")
    command = [binary, f"{flag}bn", user, password]
    return subprocess.run(command, check=True, capture_output=True).stdout.strip() + b"\n"

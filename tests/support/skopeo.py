"""Run skopeo (containers/image) as a real registry client."""

from __future__ import annotations

import shutil
import subprocess


class SkopeoError(RuntimeError):
    """skopeo exited non-zero; `stderr` says why."""

    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(args)} exited with {returncode}:\n{stderr}")
        self.returncode = returncode
        self.stderr = stderr


def skopeo(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[bytes]:
    """Run `skopeo --insecure-policy ARGS`; raise SkopeoError with its stderr on failure."""
    binary = shutil.which("skopeo")
    if binary is None:
        raise RuntimeError("skopeo not found: install it (scripts/install --test)")
    command = [binary, "--insecure-policy", *args]
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")
        raise SkopeoError(command, result.returncode, stderr)
    return result


def creds_args(prefix: str, creds: tuple[str, str] | None) -> list[str]:
    """`--{prefix}creds USER:PASS`, or `--{prefix}no-creds` so no ambient auth file is used."""
    if creds is None:
        return [f"--{prefix}no-creds"]
    return [f"--{prefix}creds", f"{creds[0]}:{creds[1]}"]


def skopeo_inspect_raw(
    ref: str, *, creds: tuple[str, str] | None = None, tls_verify: bool = False
) -> bytes:
    """The raw manifest (or index) bytes of `ref`, e.g. `docker://127.0.0.1:5000/repo:tag`."""
    result = skopeo(
        "inspect", "--raw", f"--tls-verify={str(tls_verify).lower()}", *creds_args("", creds), ref
    )
    return result.stdout

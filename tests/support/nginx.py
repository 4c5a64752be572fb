"""The oracle: Debian's nginx with the seed's `http` block (gzip, header buffers, body limit),
proxying to a backend on loopback, in a temporary prefix (never the system nginx)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from tests.support.ports import free_port, wait_for_port

# The seed's nginx.conf, the parts that decide answers (logging and file caches left out).
SEED_HTTP = """
    default_type application/octet-stream;
    client_header_buffer_size 32k;
    large_client_header_buffers 4 32k;
    client_max_body_size {client_max_body_size};
    keepalive_timeout {keepalive_timeout};
    server_tokens off;

    gzip  on;
    gzip_buffers 16 8k;
    gzip_comp_level 6;
    gzip_http_version 1.1;
    gzip_min_length 256;
    gzip_proxied any;
    gzip_vary on;
    gzip_types
        text/xml application/xml application/atom+xml application/rss+xml
        application/xhtml+xml image/svg+xml
        text/javascript application/javascript application/x-javascript
        text/x-json application/json application/x-web-app-manifest+json
        text/css text/plain text/x-component
        font/opentype application/x-font-ttf application/vnd.ms-fontobject
        image/x-icon;
    gzip_disable "MSIE [1-6]\\.(?!.*SV1)";
"""

# The seed's `log_format main`, as written there (the line ends with a space).
SEED_LOG_FORMAT = """
    log_format main '$server_name $remote_addr - $remote_user [$time_local] "$request" - '
                    '$request_body $status $body_bytes_sent "$http_referer" '
                    '"$http_user_agent" "$http_x_forwarded_for" '
                    '$ssl_protocol $ssl_cipher $request_time ';
"""

# The seed's mirror.conf plain server: every request redirected to https.
SEED_REDIRECT = """
    server {{
        listen 127.0.0.1:{port};
        server_name 127.0.0.1;
        rewrite ^(.*) https://$server_name$1 permanent;
    }}
"""

# The seed's mirror.conf `location /`, on a loopback port.
SEED_SERVER = """
    server {{
        listen 127.0.0.1:{port}{ssl};
        server_name 127.0.0.1;{access_log}{certificates}
        location / {{
            proxy_pass {backend};
            proxy_read_timeout 300;
            proxy_connect_timeout 300;
            proxy_redirect off;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header Host              $http_host;
            proxy_set_header X-Real-IP         $remote_addr;
        }}
    }}
"""


def nginx_binary() -> str:
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        pytest.skip("nginx is not installed (scripts/test installs it)")
    return binary


@contextmanager
def run_nginx(
    prefix: Path,
    backend: str,
    *,
    client_max_body_size: str = "1024m",
    tls: tuple[Path, Path] | None = None,
    workers: str = "1",
    keepalive_timeout: str = "120",
    access_log: Path | None = None,
    http_port: int | None = None,
    directives: str = "",
) -> Iterator[int]:
    """nginx with the seed's config in front of `backend` (a URL); yield its port. With `tls`
    (certificate, key) the port speaks TLS (nginx's default protocols and ciphers). With
    `access_log`, that server logs there in the seed's `main` format; with `http_port`, the
    seed's plain server (301 to https://$server_name$1) listens there; `directives` are added
    to the `http` block (e.g. "client_header_timeout 1s;")."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    temp = "".join(
        f"    {kind}_temp_path {prefix / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    certificates = (
        f"\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};" if tls else ""
    )
    config = prefix / "nginx.conf"
    config.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")  # the temp dirs are root's
        + f"worker_processes {workers};\npid {prefix / 'nginx.pid'};\n"
        + f"error_log {prefix / 'error.log'} info;\n"
        + "events { worker_connections 1024; }\n"
        + "http {\n    access_log off;\n"
        + temp
        + SEED_HTTP.replace("{client_max_body_size}", client_max_body_size).replace(
            "{keepalive_timeout}", keepalive_timeout
        )
        + f"    {directives}\n"
        + SEED_LOG_FORMAT
        + (SEED_REDIRECT.format(port=http_port) if http_port else "")
        + SEED_SERVER.format(
            port=port,
            ssl=" ssl" if tls else "",
            access_log=f"\n        access_log {access_log} main;" if access_log else "",
            certificates=certificates,
            backend=backend,
        )
        + "}\n"
    )
    log = str(prefix / "error.log")
    command = [nginx_binary(), "-p", str(prefix), "-c", str(config), "-e", log]
    process = subprocess.Popen(
        [*command, "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port)
        yield port
    finally:  # the master and its workers: nginx runs in a session (process group) of its own
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

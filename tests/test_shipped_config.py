"""The shipped proxy.toml (a Docker Hub mirror) starts with no internet and answers clearly."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.support.ports import free_port
from tests.support.servers import EdgeproxyProcess

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_starts_offline_and_reports_the_upstream(tmp_path: Path) -> None:
    port = free_port()
    text = (ROOT / "proxy.toml").read_text()
    text = re.sub(r'(?m)^root = ".*"', f'root = "{tmp_path / "cache"}"', text)
    text = re.sub(r'(?m)^listen = ".*"', f'listen = "127.0.0.1:{port}"', text)
    config = tmp_path / "proxy.toml"
    config.write_text(text)
    process = EdgeproxyProcess(config, port)
    process.start()
    try:
        assert httpx.get(f"{process.url}/v2/").status_code == 200
        response = httpx.get(f"{process.url}/v2/alpine/manifests/latest", timeout=60)
        assert response.status_code == 503
        error = response.json()["errors"][0]
        assert error["code"] == "UNAVAILABLE"
        assert "upstream docker.io is unavailable" in error["message"]
        assert "server" not in response.headers  # like nginx's server_tokens off, and more
    finally:
        process.stop()
    assert "Traceback" not in process.log()

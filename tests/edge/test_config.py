"""`[edge]` in proxy.toml: the seed's values by default, parsed once, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy.config import ConfigError, load_config

MIRROR = '[mirror]\n[[mirror.upstream]]\nname = "docker.io"\nurl = "https://registry-1.docker.io"\n'


def load(tmp_path: Path, edge: str) -> object:
    path = tmp_path / "proxy.toml"
    path.write_text(MIRROR + edge)
    return load_config(path)


def test_edge_is_optional(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MIRROR)
    assert load_config(path).edge is None


def test_seed_values_parsed(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        MIRROR + '[edge]\nhttp = "0.0.0.0:80"\nhttps = ":443"\nserver_name = "m.example.com"\n'
        'backend = "http://mirror:5000"\nconnect_timeout = "300s"\nread_timeout = "5m"\n'
        'keepalive_timeout = 120\nclient_max_body_size = "1024m"\naccess_log = "log/access.log"\n'
        'access_log_format = "json"\n[edge.tls]\ncertificate = "certs/server.crt"\n'
        'key = "certs/server.key"\n[edge.gzip]\nenabled = true\n'
    )
    edge = load_config(path).edge
    assert edge is not None
    assert edge.http == ("0.0.0.0", 80) and edge.https == ("0.0.0.0", 443)
    assert edge.backend_url == "http://mirror:5000" and not edge.embedded
    assert (edge.connect_timeout, edge.read_timeout, edge.keepalive_timeout) == (300, 300, 120)
    assert edge.client_max_body_size == 1 << 30
    assert edge.access_log == str(tmp_path / "log" / "access.log")
    assert edge.tls is not None and edge.tls.certificate == tmp_path / "certs" / "server.crt"
    assert edge.gzip.enabled


@pytest.mark.parametrize(
    ("edge", "message"),
    [
        ("[edge]\n", "edge: set http or https"),
        ('[edge]\nhttps = ":443"\n', "edge: https needs [edge.tls]"),
        ('[edge]\nhttp = ":80"\nbackend = "mirror:5000"\n', 'edge.backend: not "embedded" or http'),
        ('[edge]\nhttp = ":80"\nread_timeout = "soon"\n', "edge.read_timeout: not a duration"),
        ('[edge]\nhttp = ":80"\naccess_log_format = "combined"\n', "edge.access_log_format"),
        ('[edge]\nhttp = ":80"\nworker = 2\n', "edge.worker: unknown key"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, edge: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, edge)
    assert message in str(caught.value)

"""The access log line, as nginx prints the seed's `main` format; and the json format."""

from __future__ import annotations

import base64
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgeproxy.edge.accesslog import AccessLog, Entry, basic_user, escape, format_main
from edgeproxy.mirror.cache_status import cache_state

MOMENT = datetime(2026, 11, 7, 20, 4, 5, tzinfo=timezone(timedelta(hours=1)))


def entry(**changes: object) -> Entry:
    fields: dict[str, object] = {
        "server_name": "mirror.example.com",
        "remote_addr": "192.0.2.1",
        "remote_user": "",
        "time": MOMENT,
        "request": "GET /v2/library/alpine/manifests/latest HTTP/1.1",
        "request_body": None,
        "status": 200,
        "body_bytes_sent": 1472,
        "http_referer": None,
        "http_user_agent": "docker/20.10.24 go/go1.19.8",
        "http_x_forwarded_for": None,
        "ssl_protocol": "TLSv1.3",
        "ssl_cipher": "TLS_AES_256_GCM_SHA384",
        "request_time": 0.0123,
        "cache": "HIT",
    }
    fields.update(changes)
    return Entry(**fields)  # type: ignore[arg-type]


def test_main_line_field_for_field() -> None:
    assert format_main(entry()) == (
        "mirror.example.com 192.0.2.1 - - [07/Nov/2026:20:04:05 +0100] "
        '"GET /v2/library/alpine/manifests/latest HTTP/1.1" - - 200 1472 "-" '
        '"docker/20.10.24 go/go1.19.8" "-" TLSv1.3 TLS_AES_256_GCM_SHA384 0.012 '
    )


def test_plain_http_with_a_body_a_user_and_a_forwarded_for() -> None:
    line = format_main(
        entry(
            server_name="",
            remote_user="tester",
            request="PUT /v2/x/manifests/v1 HTTP/1.1",
            request_body=b'{"a": "\xc3\xa9"}\n',
            status=201,
            body_bytes_sent=0,
            http_referer="http://r/",
            http_x_forwarded_for="203.0.113.7",
            ssl_protocol="",
            ssl_cipher="",
            request_time=1.5,
        )
    )
    assert line == (
        "- 192.0.2.1 - tester [07/Nov/2026:20:04:05 +0100] "
        '"PUT /v2/x/manifests/v1 HTTP/1.1" - {\\x22a\\x22: \\x22\\xC3\\xA9\\x22}\\x0A '
        '201 0 "http://r/" "docker/20.10.24 go/go1.19.8" "203.0.113.7" - - 1.500 '
    )


def test_an_empty_body_declared_is_printed_empty() -> None:
    assert ' HTTP/1.1" -  200 ' in format_main(entry(request_body=b""))
    assert ' HTTP/1.1" - - 200 ' in format_main(entry(request_body=None))


def test_a_header_sent_empty_is_printed_empty() -> None:
    assert ' 200 1472 "" "" "-" ' in format_main(entry(http_referer="", http_user_agent=""))


def test_escaping_as_nginx() -> None:
    assert escape("") == "-"
    assert escape('a"b\\c\x01\x7f') == "a\\x22b\\x5Cc\\x01\\x7F"


def test_remote_user_and_cache_state() -> None:
    assert basic_user(b"Basic " + base64.b64encode(b"tester:secret")) == "tester"
    assert basic_user(b"Bearer abc") == ""
    assert basic_user(b"Basic !!!") == ""
    assert basic_user(None) == ""
    assert cache_state(b"edgeproxy; hit") == "HIT"
    assert cache_state(b"edgeproxy; fwd=miss") == "MISS"
    assert cache_state(b"edgeproxy; hit; detail=stale") == "STALE"
    assert cache_state(b"edgeproxy; fwd=stale; fwd-status=200") == "REVALIDATED"
    assert cache_state(None) == ""


def test_log_file_main_and_json(tmp_path: Path) -> None:
    main_log = AccessLog(str(tmp_path / "main.log"))
    main_log.write(entry())
    main_log.close()
    assert (tmp_path / "main.log").read_text() == format_main(entry()) + "\n"
    json_log = AccessLog(str(tmp_path / "json.log"), "json")
    json_log.write(entry())
    json_log.close()
    record = json.loads((tmp_path / "json.log").read_text())
    assert record["cache"] == "HIT"
    assert record["status"] == 200
    assert record["ssl_protocol"] == "TLSv1.3"
    assert record["request_time"] == 0.012
    AccessLog("off").write(entry())  # writes nothing, raises nothing


def test_a_full_disk_drops_lines_not_requests(caplog: pytest.LogCaptureFixture) -> None:
    """/dev/full answers every write ENOSPC: no exception reaches the request, and the error
    log says so once, not once per request."""
    full = AccessLog("/dev/full")
    with caplog.at_level(logging.ERROR, logger="edgeproxy.accesslog"):
        for _ in range(3):
            full.write(entry())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "write to /dev/full failed" in errors[0]
    full.close()  # its buffer holds a line it cannot write: dropped too

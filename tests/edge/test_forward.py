"""The headers a backend receives (the seed's proxy_set_header lines, RFC 9110 hop-by-hop)."""

from __future__ import annotations

from edgeproxy.edge.forward import forwarded_headers, strip_hop_by_hop


def test_host_kept_forwarded_headers_set_and_xff_appended() -> None:
    client = [
        (b"host", b"mirror.example.com"),
        (b"x-forwarded-proto", b"gopher"),
        (b"x-real-ip", b"10.9.9.9"),
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"x-forwarded-for", b"198.51.100.2"),
        (b"accept", b"a"),
        (b"accept", b"b"),
    ]
    out = forwarded_headers(client, "https", "192.0.2.1")
    assert out == [
        (b"host", b"mirror.example.com"),
        (b"accept", b"a"),
        (b"accept", b"b"),
        (b"x-forwarded-proto", b"https"),
        (b"x-real-ip", b"192.0.2.1"),
        (b"x-forwarded-for", b"203.0.113.7, 198.51.100.2, 192.0.2.1"),
    ]


def test_first_hop_sets_xff_to_the_client() -> None:
    out = dict(forwarded_headers([(b"host", b"h")], "http", "127.0.0.1"))
    assert out[b"x-forwarded-for"] == b"127.0.0.1"
    assert out[b"x-forwarded-proto"] == b"http"


def test_hop_by_hop_removed_with_the_fields_connection_names() -> None:
    client = [
        (b"host", b"h"),
        (b"connection", b"keep-alive, X-Secret , Host"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"x-secret", b"1"),
        (b"content-length", b"3"),
        (b"trailer", b"x-checksum"),
    ]
    # Host is never dropped, even when Connection names it; Trailer is not hop-by-hop in 9110.
    assert strip_hop_by_hop(client) == [
        (b"host", b"h"),
        (b"content-length", b"3"),
        (b"trailer", b"x-checksum"),
    ]


def test_response_header_names_compared_case_insensitively() -> None:
    backend = [(b"Connection", b"X-Hop"), (b"X-Hop", b"1"), (b"Location", b"/v2/x")]
    assert strip_hop_by_hop(backend) == [(b"Location", b"/v2/x")]


def test_names_nginx_ignores_are_not_forwarded() -> None:
    client = [(b"host", b"h"), (b"x_real_ip", b"6.6.6.6"), (b"x.dot", b"1"), (b"x-ok-9", b"2")]
    out = forwarded_headers(client, "https", "192.0.2.1")
    assert [name for name, _ in out] == [
        b"host", b"x-ok-9", b"x-forwarded-proto", b"x-real-ip", b"x-forwarded-for"
    ]  # fmt: skip

"""The nginx part: TLS, 80→443, forwarded headers, limits, access log (HTTP, not registries)."""

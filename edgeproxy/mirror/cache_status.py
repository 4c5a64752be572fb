"""RFC 9211 `Cache-Status` values: what the cache did for a response, errors included."""

from __future__ import annotations

HIT = "edgeproxy; hit"
MISS = "edgeproxy; fwd=miss"
REVALIDATED = "edgeproxy; fwd=stale; fwd-status=200"
STALE = "edgeproxy; hit; detail=stale"


def forwarded(upstream_status: int | None) -> str:
    """A miss the upstream answered with `upstream_status` (None: it did not answer)."""
    return MISS if upstream_status is None else f"{MISS}; fwd-status={upstream_status}"


def cache_state(cache_status: bytes | None) -> str:
    """HIT / MISS / STALE / REVALIDATED from an RFC 9211 Cache-Status of the mirror."""
    tokens = {token.strip() for token in (cache_status or b"").decode("latin-1").split(";")}
    if "detail=stale" in tokens:
        return "STALE"
    if "fwd=stale" in tokens:
        return "REVALIDATED"
    if "fwd=miss" in tokens:
        return "MISS"
    if "hit" in tokens:
        return "HIT"
    return ""

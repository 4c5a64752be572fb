"""A cache verifier for tests: re-hash every blob under a cache root, list what is left over.

(`edgeproxy cache verify` is the operator's tool; this is the tests' independent check.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CacheReport:
    blobs: int = 0  # blobs whose bytes match their digest
    corrupt: list[str] = field(default_factory=list)  # digests whose bytes do not
    leftovers: list[str] = field(default_factory=list)  # spool files of fills: *.partial, *.size


def verify_cache(root: Path) -> CacheReport:
    report = CacheReport()
    for data in sorted((root / "docker" / "registry" / "v2" / "blobs").glob("*/*/*/data")):
        algorithm, hex_ = data.parent.parent.parent.name, data.parent.name
        hasher = hashlib.new(algorithm)
        with data.open("rb") as file:
            while block := file.read(1 << 20):
                hasher.update(block)
        if hasher.hexdigest() == hex_:
            report.blobs += 1
        else:
            report.corrupt.append(f"{algorithm}:{hex_}")
    fills = root / "edgeproxy" / "fills"
    report.leftovers = sorted(p.name for p in fills.glob("*") if p.suffix != ".lock")
    return report

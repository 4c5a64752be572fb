"""edgeproxy: a Docker registry mirror with its own TLS edge."""

import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeproxy")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0"

# httpx imports its command-line tool when click and rich are installed (ours are, for uvicorn
# and `edgeproxy cache`): 4 MB in every worker for a tool we never run. Its fallback stands in.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

"""edgeproxy: a Docker registry mirror with its own TLS edge."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeproxy")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0"

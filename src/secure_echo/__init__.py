"""secure-echo: a hardened TLS line-echo daemon built on Twisted."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("secure-echo")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

"""edgetl: labelled image folder -> verified, quantized edge bundles."""

from .threads import wait_passively as _wait_passively


def _version() -> str:
    """The installed package's version (pyproject.toml's, through the package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgetl")
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "0+unknown"


__version__ = _version()
_wait_passively()  # before anything imports torch: its OpenMP threads sleep while they wait (threads.py)

"""Typed errors. Each carries the process exit code the CLI uses for it.

Exit codes (documented in the README):
  0  built / intact
  1  a parity gate failed (nothing published for that target) or a bundle failed `verify`
  2  usage or bad input: recipe, data folder, weights, options
  3  an internal step failed (export check, quantizer crash): a bug or an unsupported model
"""

from __future__ import annotations


class EdgetlError(Exception):
    exit_code = 3


class UsageError(EdgetlError):
    """Bad recipe, option or input file. The message names the file/option and the fix."""

    exit_code = 2


class DataError(UsageError):
    """The image folder cannot be used as given."""


class WeightsError(UsageError):
    """Pretrained weights could not be found or failed their checksum."""


class MissingDependencyError(UsageError):
    """An optional heavy dependency is not installed; the message says what to pip install."""


class ExportError(EdgetlError):
    """The exported/quantized model does not match what it was exported from."""


class BudgetExceeded(EdgetlError):
    """A search candidate passed a wall-clock limit the user set: the whole candidate is dropped
    (never shortened), and the build warns that what shipped depends on the machine's speed."""


class DiskFullError(EdgetlError):
    """A write found no space left (exit 3: the build could not finish; nothing was published)."""


class Stopped(EdgetlError):
    """The build was stopped by a signal: the exit code is 128 + the signal's number (130, 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code



class VerifyError(EdgetlError):
    """A bundle's files do not match its manifest."""

    exit_code = 1

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


def require(module: str, extra: str):
    """Import a heavy optional module lazily, with an install hint instead of a bare ImportError."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"'{module}' is not installed; fix: pip install 'edgetl[{extra}]'"
        ) from None

"""edgetl: labelled image folder -> verified, quantized edge bundles."""

from .threads import wait_passively as _wait_passively

__version__ = "0.2.0"
_wait_passively()  # before anything imports torch: its OpenMP threads sleep while they wait (threads.py)

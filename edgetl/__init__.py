"""edgetl: labelled image folder -> verified, quantized edge bundles."""

__version__ = "0.1.0"

"""edgetl: labelled image folder -> verified, quantized edge bundles."""

__version__ = "0.2.0"

"""Torch-free code that is copied *into* bundles. Only numpy, Pillow and the target's runtime."""

"""Model definitions edgetl writes itself (torchvision covers the rest)."""

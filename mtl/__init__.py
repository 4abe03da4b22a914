"""mtl: the multi-task library (PyTorch and transformers only, no Ray)."""

__version__ = "0.1.0"

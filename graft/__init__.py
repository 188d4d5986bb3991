"""graft: transfer learning with transformers."""

__version__ = "0.1.0"

"""graft's CPU kernels, behind one switch (``optimize`` / ``reference``).

graft.nn is the plain reference model. This package holds what makes it fast on CPU: oneDNN
linear layers with fused activations and weights packed once (linear.py), cheap dropout masks
(dropout.py), fused Q/K/V and gate/up, one rotation for queries and keys, attention dropout that
keeps little for backward (attention.py, feedforward.py), and compiled decoding over a
fixed-size cache (decode.py). ``load_model`` turns them on by default (``kernels=False``: the
reference).
"""

from graft.kernels.switch import (
    PACK_LIMIT,
    Kernels,
    enabled,
    frozen,
    kernels_of,
    optimize,
    reference,
    report,
)

__all__ = ["PACK_LIMIT", "Kernels", "enabled", "frozen", "kernels_of", "optimize", "reference", "report"]

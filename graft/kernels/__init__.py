"""graft's CPU kernels, behind one switch (``optimize`` / ``reference``).

graft.nn is the plain reference model. This package holds what makes it fast on CPU: oneDNN
linear layers with fused activations and weights packed once (linear.py), cheap dropout masks
(dropout.py), fused Q/K/V and gate/up, one rotation for queries and keys, attention dropout that
keeps little for backward (attention.py, feedforward.py), and compiled decoding over a
fixed-size cache (decode.py). Each linear call takes the fastest of oneDNN on packed weights,
oneDNN and torch's F.linear for its shape on this CPU, timed at first use and kept per processor
(calibrate.py; $GRAFT_KERNEL_ROUTE forces one). ``load_model`` turns them on by default
(``kernels=False``: the reference).
"""

from graft.kernels.calibrate import Calibration
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

__all__ = [
    "PACK_LIMIT",
    "Calibration",
    "Kernels",
    "enabled",
    "frozen",
    "kernels_of",
    "optimize",
    "reference",
    "report",
]

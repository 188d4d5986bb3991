"""Language-model metrics: perplexity from negative log-likelihoods (natural log)."""

import math
from collections.abc import Sequence

import numpy as np

from graft.errors import GraftError


def perplexity(nll: float | Sequence[float]) -> float:
    """exp of the mean negative log-likelihood per token; `nll` is that mean or the per-token values."""
    values = np.asarray(nll, dtype=np.float64).ravel()
    if values.size == 0:
        raise GraftError("perplexity needs at least one negative log-likelihood")
    if not np.isfinite(values).all():
        raise GraftError("perplexity got a negative log-likelihood that is nan or infinite")
    try:
        return math.exp(float(values.mean()))
    except OverflowError:  # a mean above ~709.8 nats per token
        return math.inf

"""Temperature scaling (Guo et al., 2017): calibrated probabilities from one fitted number.

A classifier trained with BCE on a few hundred images is usually over-confident: it says 99% on
films that are positive far less often. Temperature scaling divides every logit by one number
``T`` fitted on the validation split (the negative log-likelihood of the validation labels is
minimised over ``T``). It is monotone, so the ranking (AUROC, AUPRC) and every decision at the
correspondingly mapped threshold are unchanged; only the probabilities move. ``T`` is stored in
the checkpoint (``meta["temperature"]``) and applied by every backend after the network.

Hand-written: scikit-learn's ``CalibratedClassifierCV`` wraps an estimator rather than a fixed
set of logits, and this is a one-dimensional convex minimisation (``scipy.optimize``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "EPS",
    "apply_temperature",
    "fit_temperature",
    "logit",
    "map_threshold",
]

EPS = 1e-7
"""Probabilities are clipped to ``[EPS, 1 - EPS]`` before taking their logit (float32 sigmoids
saturate to exactly 0 or 1)."""


def logit(p: np.ndarray | float) -> np.ndarray:
    """``log(p / (1 - p))`` of probabilities clipped to ``[EPS, 1 - EPS]``, in float64."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / T)``, same dtype as the input; ``T = 1`` returns it unchanged."""
    p = np.asarray(probabilities)
    if temperature == 1.0:
        return p
    dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
    return _sigmoid(logit(p) / temperature).astype(dtype)


def map_threshold(threshold: float, temperature: float) -> float:
    """The calibrated-scale threshold that makes the same decisions as ``threshold`` did."""
    return float(apply_temperature(np.asarray([threshold], np.float64), temperature)[0])


def fit_temperature(
    probabilities: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """The temperature minimising the labels' negative log-likelihood.

    Args:
        probabilities: Uncalibrated probabilities of the positive class (validation split).
        labels: 0/1 labels, same length.
        weights: Per-image weights of the likelihood (default: equal).
        bounds: Range searched for ``T``.

    Returns:
        ``T`` (> 1 softens over-confident probabilities); 1.0 when the labels hold a single
        class (nothing to fit).

    Raises:
        ValueError: Lengths differ, or values are not finite probabilities.
    """
    from scipy.optimize import minimize_scalar

    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities but {y.size} labels")
    if not np.all(np.isfinite(p)) or p.min(initial=0) < 0 or p.max(initial=0) > 1:
        raise ValueError("probabilities must be finite and in [0, 1]")
    if y.size == 0 or y.min() == y.max():
        return 1.0
    z = logit(p)
    w = np.ones_like(z) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != z.shape:
        raise ValueError(f"{z.size} probabilities but {w.size} weights")

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        # log(1 + exp(-s)) for positives, log(1 + exp(s)) for negatives, stably.
        return float(np.average(np.logaddexp(0.0, np.where(y > 0.5, -s, s)), weights=w))

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))

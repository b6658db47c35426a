"""Bootstrap confidence intervals (resampling images), seedable and deterministic."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci"]


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: Sequence,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(*arrays)``, resampling the first axis (images) jointly.

    ``arrays`` share their length N (one entry per image). Resamples where the statistic is
    undefined (returns NaN, e.g. AUC with one class) are dropped. Returns ``(lo, hi)``; ``(nan, nan)``
    when N == 0 or every resample is undefined. Same ``seed`` → same interval.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0]) if arrays else 0
    if n == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        v = statistic(*(a[idx] for a in arrays))
        if v is not None and np.isfinite(v):
            values.append(float(v))
    if not values:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))

"""Image-level classification metrics with the TBX11K definitions (TBX11K-FORMAT.md §5).

For ``labels (N,) int`` and ``probs (N, C) float`` (C = 3: healthy/sick/tb, or 2: non_tb/tb; TB is the
last column), with ``pred = argmax(probs)``:

* ``accuracy``: C-class accuracy.
* ``auc_tb``: ROC AUC of TB vs rest on ``p(TB)`` (``sklearn.metrics.roc_auc_score``).
* ``sensitivity``: TB recall, ``P(pred == TB | y == TB)``.
* ``specificity``: non-TB recall, ``P(pred != TB | y != TB)`` — a sick (non-TB) image predicted healthy
  still counts as correct here.
* ``precision_macro`` / ``recall_macro``: per-class precision / recall averaged over the C classes
  (the TBX11K "AP"/"AR"; not PR-AUC), over the classes present in ``labels`` or predictions, with an
  undefined per-class value counted as 0 (exactly scikit-learn's ``average="macro", zero_division=0``).
* ``confusion_matrix``: C x C list, rows = true class, columns = predicted class.
* ``<name>_ci95``: percentile bootstrap 95 % interval (resampling images, ``tbkd_lib.stats.bootstrap_ci``,
  seeded) for accuracy, auc_tb, sensitivity, specificity, precision_macro, recall_macro.

Undefined values (AUC with one class present, sensitivity without TB images, ...) are ``None``, never NaN.
"""
from __future__ import annotations

import math

import numpy as np

from .data.records import class_names
from .errors import ConfigError
from .stats import bootstrap_ci

__all__ = ["classification_metrics", "roc_curve_tb", "CI_METRICS"]

CI_METRICS = ("accuracy", "auc_tb", "sensitivity", "specificity", "precision_macro", "recall_macro")


def _confusion(labels: np.ndarray, preds: np.ndarray, c: int) -> np.ndarray:
    return np.bincount(labels * c + preds, minlength=c * c).reshape(c, c)


def _accuracy(labels, preds, probs_tb):
    return float(np.mean(labels == preds)) if len(labels) else math.nan


def _sensitivity(labels, preds, probs_tb, tb):
    pos = labels == tb
    return float(np.mean(preds[pos] == tb)) if pos.any() else math.nan


def _specificity(labels, preds, probs_tb, tb):
    neg = labels != tb
    return float(np.mean(preds[neg] != tb)) if neg.any() else math.nan


def _precision_macro(labels, preds, probs_tb, c):
    cm = _confusion(labels, preds, c)
    predicted = cm.sum(axis=0)
    per_class = np.divide(np.diag(cm), predicted, out=np.zeros(c), where=predicted > 0)
    present = (cm.sum(axis=1) + predicted) > 0  # sklearn averages over labels seen in y_true or y_pred
    return float(per_class[present].mean()) if present.any() else math.nan


def _recall_macro(labels, preds, probs_tb, c):
    cm = _confusion(labels, preds, c)
    support = cm.sum(axis=1)
    per_class = np.divide(np.diag(cm), support, out=np.zeros(c), where=support > 0)
    present = (support + cm.sum(axis=0)) > 0
    return float(per_class[present].mean()) if present.any() else math.nan


def _auc(labels, preds, probs_tb, tb):
    """Mann-Whitney form of the ROC AUC (ties count 1/2); equals ``roc_auc_score`` and is ~50x faster."""
    pos = labels == tb
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(probs_tb, kind="mergesort")
    s = probs_tb[order]
    ranks = np.empty(len(s))
    # average ranks over ties
    _, start, counts = np.unique(s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _none(v) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def classification_metrics(labels, probs, scheme: str = "3class", n_boot: int = 1000, seed: int = 0) -> dict:
    """TBX11K classification metrics (see the module docstring) of ``labels (N,)`` vs ``probs (N, C)``.

    ``n_boot=0`` skips the bootstrap intervals (the ``*_ci95`` keys are then absent). Returns plain
    Python types (JSON-able) with ``None`` for undefined values.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    c = len(class_names(scheme))
    if probs.ndim != 2 or probs.shape[1] != c or len(probs) != len(labels):
        raise ConfigError(f"probs must be (N, {c}) for scheme {scheme!r} with N = len(labels) = {len(labels)}; "
                          f"got {probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= c):
        raise ConfigError(f"labels must be in [0, {c - 1}] for scheme {scheme!r}")
    tb = c - 1
    preds = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    probs_tb = probs[:, tb] if len(probs) else np.zeros(0)

    stats = {
        "accuracy": _accuracy,
        "auc_tb": lambda y, p, s: _auc(y, p, s, tb),
        "sensitivity": lambda y, p, s: _sensitivity(y, p, s, tb),
        "specificity": lambda y, p, s: _specificity(y, p, s, tb),
        "precision_macro": lambda y, p, s: _precision_macro(y, p, s, c),
        "recall_macro": lambda y, p, s: _recall_macro(y, p, s, c),
    }
    out: dict = {}
    for name, fn in stats.items():
        out[name] = _none(fn(labels, preds, probs_tb))
    if out["auc_tb"] is not None:  # the reported point estimate is scikit-learn's own
        from sklearn.metrics import roc_auc_score

        out["auc_tb"] = float(roc_auc_score(labels == tb, probs_tb))
    out["confusion_matrix"] = _confusion(labels, preds, c).tolist()
    out["n"] = int(len(labels))
    if n_boot and len(labels):
        for name in CI_METRICS:
            lo, hi = bootstrap_ci(stats[name], labels, preds, probs_tb, n_boot=n_boot, seed=seed)
            out[f"{name}_ci95"] = None if not (math.isfinite(lo) and math.isfinite(hi)) else [lo, hi]
    return out


def roc_curve_tb(labels, probs) -> dict:
    """ROC curve of TB vs rest on ``p(TB) = probs[:, -1]``: ``{"fpr", "tpr", "thresholds", "auc"}`` (lists).

    ``auc`` is ``None`` and the curve empty when only one class is present.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    tb = probs.shape[1] - 1
    y = labels == tb
    if y.all() or not y.any():
        return {"fpr": [], "tpr": [], "thresholds": [], "auc": None}
    fpr, tpr, thr = roc_curve(y, probs[:, tb])
    thr = np.where(np.isfinite(thr), thr, 1.0)  # sklearn's first threshold is +inf
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist(),
            "auc": float(roc_auc_score(y, probs[:, tb]))}

"""Figures with one shared style. Every helper takes ``ax=None`` and returns the axes.

Images are ``float32 (H, W)`` in [0, 1] (or tensors of that shape, or ``(1, H, W)``); boxes are xyxy
pixels. Ground-truth boxes are drawn in green, predicted boxes in orange dashes, planted shortcut
boxes in magenta, and ``tau`` always appears in a title when a threshold is shown.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["set_style", "show_image", "overlay_saliency", "plot_training_curves", "plot_roc",
           "plot_confusion", "plot_iou_vs_tau", "plot_miou_table", "plot_paired_differences", "plot_soft_targets", "save_figure",
           "draw_boxes", "GT_COLOR", "PRED_COLOR", "CUE_COLOR"]

GT_COLOR = "#2ca02c"
PRED_COLOR = "#ff7f0e"
CUE_COLOR = "#e377c2"


def set_style() -> None:
    """The book's figure style (seaborn 'ticks', readable fonts, no top/right spines)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="ticks", context="notebook")
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 120, "axes.spines.top": False,
                         "axes.spines.right": False, "image.cmap": "gray", "axes.titlesize": 11})


def _ax(ax, figsize=(5, 4)):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def _np2d(image) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image, dtype=np.float32)
    while image.ndim > 2:
        image = image[0]
    return image


def draw_boxes(ax, boxes, color=GT_COLOR, linestyle="-", linewidth=1.8, label=None):
    """Draw xyxy boxes (pixels) on ``ax``; returns ``ax``."""
    from matplotlib.patches import Rectangle

    if boxes is None:
        return ax
    boxes = np.asarray(boxes.detach().cpu() if hasattr(boxes, "detach") else boxes, dtype=np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes.reshape(-1, 4)):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                               linestyle=linestyle, linewidth=linewidth,
                               label=label if i == 0 else None))
    return ax


def show_image(image, boxes=None, pred_boxes=None, cue_boxes=None, title=None, ax=None):
    """Grey image with ground-truth (green), predicted (orange, dashed) and cue (magenta) boxes."""
    ax = _ax(ax, (4, 4))
    ax.imshow(_np2d(image), cmap="gray", vmin=0, vmax=1)
    draw_boxes(ax, boxes, GT_COLOR)
    draw_boxes(ax, pred_boxes, PRED_COLOR, linestyle="--")
    draw_boxes(ax, cue_boxes, CUE_COLOR)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def overlay_saliency(image, saliency, boxes=None, pred_boxes=None, alpha=0.45, tau=None, title=None,
                     cmap="jet", ax=None):
    """Saliency (H, W) in [0, 1] over the image; with ``tau`` the mask outline is drawn and named."""
    ax = _ax(ax, (4, 4))
    img = _np2d(image)
    sal = _np2d(saliency)
    ax.imshow(img, cmap="gray", vmin=0, vmax=1)
    ax.imshow(sal, cmap=cmap, alpha=alpha, vmin=0, vmax=1,
              extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
    if tau is not None:
        ax.contour(sal >= tau, levels=[0.5], colors="white", linewidths=1.0)
    draw_boxes(ax, boxes, GT_COLOR)
    draw_boxes(ax, pred_boxes, PRED_COLOR, linestyle="--")
    ax.set_axis_off()
    if title or tau is not None:
        ax.set_title((title or "") + (f"  (tau={tau:.2f})" if tau is not None else ""))
    return ax


def plot_training_curves(rows: Sequence[Mapping], keys=("train_loss", "val_loss"), ax=None, label=None):
    """Curves from ``metrics.jsonl`` rows (one dict per epoch)."""
    ax = _ax(ax)
    epochs = [r["epoch"] for r in rows]
    for key in keys:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", ms=3,
                    label=f"{label} {key}" if label else key)
    ax.set_xlabel("epoch")
    ax.legend(frameon=False)
    return ax


def plot_roc(labels, probs, tb_class: int | None = None, ax=None, label="model"):
    """ROC of TB vs rest from per-image class probabilities ``probs (N, C)``; TB is the last class."""
    from sklearn.metrics import roc_auc_score, roc_curve

    ax = _ax(ax, (4, 4))
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    tb = probs.shape[1] - 1 if tb_class is None else tb_class
    y = (labels == tb).astype(int)
    fpr, tpr, _ = roc_curve(y, probs[:, tb])
    auc = roc_auc_score(y, probs[:, tb]) if 0 < y.sum() < len(y) else float("nan")
    ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (TB recall)")
    ax.legend(frameon=False, loc="lower right")
    return ax


def plot_confusion(cm, class_names: Sequence[str], ax=None, title=None):
    """Confusion matrix (rows = true class) as a seaborn heat-map with counts."""
    import seaborn as sns

    ax = _ax(ax, (4, 3.5))
    sns.heatmap(np.asarray(cm), annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax,
                xticklabels=class_names, yticklabels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return ax


def plot_iou_vs_tau(curves: Mapping[str, Mapping], ax=None, baseline: Mapping | None = None):
    """mIoU against ``tau`` for several models/methods: ``{"teacher gradcam": {"tau": [...], "miou": [...]}}``."""
    ax = _ax(ax, (5.5, 4))
    for name, curve in curves.items():
        ax.plot(curve["tau"], curve["miou"], marker=".", label=name)
    if baseline is not None:
        ax.plot(baseline["tau"], baseline["miou"], color="black", ls="--", label="prior-only baseline")
    ax.set_xlabel("tau (threshold on the normalised map)")
    ax.set_ylabel("mIoU (TB images)")
    ax.legend(frameon=False, fontsize=8)
    return ax


def plot_miou_table(rows: Sequence[Mapping], baseline: float | None = None, ax=None,
                    baseline_label="prior-only baseline"):
    """Horizontal bars of mIoU with 95 % CIs. ``rows``: ``{"name", "miou", "miou_ci95"}``."""
    ax = _ax(ax, (6, 0.45 * len(rows) + 1.2))
    names = [r["name"] for r in rows]
    values = np.array([r["miou"] if r["miou"] is not None else np.nan for r in rows])
    lo = np.array([r["miou_ci95"][0] if r.get("miou_ci95") and r["miou_ci95"][0] is not None else v
                   for r, v in zip(rows, values)])
    hi = np.array([r["miou_ci95"][1] if r.get("miou_ci95") and r["miou_ci95"][1] is not None else v
                   for r, v in zip(rows, values)])
    y = np.arange(len(rows))
    colors = ["#4c72b0" if "teacher" in n else "#dd8452" if "student" in n else "#8c8c8c" for n in names]
    ax.barh(y, values, xerr=[values - lo, hi - values], color=colors, capsize=3)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    if baseline is not None:
        ax.axvline(baseline, color="black", ls="--", lw=1.2, label=f"{baseline_label} ({baseline:.3f})")
        ax.legend(frameon=False, loc="lower right", fontsize=8)
    ax.set_xlabel("mIoU with 95 % bootstrap CI")
    return ax


def plot_paired_differences(diffs: Mapping[str, Mapping], ax=None, label="student − teacher mIoU"):
    """Dots with 95 % CIs of paired differences, one row per method, and a line at 0.

    ``diffs``: ``{method: {"diff", "ci95"}}`` (``tbkd_lib.locmetrics.paired_difference``). Rows whose
    interval excludes 0 are drawn filled, the others hollow."""
    ax = _ax(ax, (6, 0.45 * len(diffs) + 1.2))
    names = list(diffs)
    y = np.arange(len(names))
    for yi, name in zip(y, names):
        d = diffs[name]
        if d.get("diff") is None:
            continue
        lo, hi = d["ci95"] if d.get("ci95") else (d["diff"], d["diff"])
        real = lo > 0 or hi < 0
        color = "#dd8452" if d["diff"] > 0 else "#4c72b0"
        ax.errorbar(d["diff"], yi, xerr=[[d["diff"] - lo], [hi - d["diff"]]], fmt="o", color=color, capsize=3,
                    markerfacecolor=color if real else "white")
    ax.axvline(0.0, color="black", lw=1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} (paired bootstrap 95 % CI; filled: excludes 0)")
    return ax


def plot_soft_targets(logits, temperatures=(1, 2, 4, 8), class_names=("healthy", "sick", "tb"), ax=None):
    """Softmax(logits / T) for several temperatures: how KD's soft targets flatten as T grows."""
    import torch

    ax = _ax(ax, (5.5, 3.5))
    z = torch.as_tensor(logits, dtype=torch.float32)
    width = 0.8 / len(temperatures)
    x = np.arange(len(class_names))
    for i, t in enumerate(temperatures):
        p = torch.softmax(z / t, dim=-1).numpy()
        ax.bar(x + i * width - 0.4 + width / 2, p, width, label=f"T = {t}")
    ax.set_xticks(x, class_names)
    ax.set_ylabel("probability")
    ax.legend(frameon=False)
    return ax


def save_figure(fig, path) -> None:
    """Save ``fig`` (tight, 120 dpi) and close it (a pyplot figure or a bare ``matplotlib.figure.Figure``)."""
    import matplotlib.pyplot as plt
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)

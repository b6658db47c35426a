"""Localization scores on torch tensors, vectorised over the batch (CheXlocalize, Saporta et al. 2022).

Shapes: ``saliency`` float ``(B, H, W)`` ``>= 0``; ``saliency_norm`` the same in [0, 1];
``masks``/``gt_masks`` bool ``(B, H, W)``; ``boxes`` float ``(K, 4)`` xyxy pixels with exclusive
x2/y2 edges (see :mod:`tbkd_lib.protocol`).

What is averaged, exactly:

* :func:`mask_iou` — per image ``|P ∩ G| / |P ∪ G|``; an empty prediction against a non-empty GT is 0;
  both empty is 1 (nothing predicted, nothing there). Never NaN.
* :func:`miou` — the mean of per-image mask IoU over the images whose GT mask is not empty (TB images
  with ≥ 1 box); images without boxes are left out, never counted as 0 or 1.
* :func:`box_iou_best` — for each GT box, the best IoU with any predicted box (0 if none).
* :func:`pointing_game` — hit if the most salient pixel lies inside the GT mask (CheXlocalize "hit
  rate"); ties → the first maximum in raster order; a map with no positive value is a miss.
* :func:`energy_pointing` — the share of saliency mass inside the GT mask (Wang et al. 2020,
  Score-CAM); an all-zero map scores 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .protocol import DEFAULT_TAUS, boxes_to_mask, gt_masks_from_boxes, threshold
from .stats import bootstrap_ci

__all__ = ["mask_iou", "miou", "box_iou_best", "pointing_game", "energy_pointing", "iou_vs_tau",
           "summarize", "paired_difference", "saliency_share_in_boxes", "prior_map", "centre_box_saliency"]


def _same_shape(a: Tensor, b: Tensor, names: str) -> None:
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"{names}: expected two (B, H, W) tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def mask_iou(pred_masks: Tensor, gt_masks: Tensor) -> Tensor:
    """Per-image IoU of bool masks ``(B, H, W)`` → float32 ``(B,)`` (both empty → 1, never NaN)."""
    _same_shape(pred_masks, gt_masks, "pred_masks, gt_masks")
    p, g = pred_masks.bool().flatten(1), gt_masks.bool().to(pred_masks.device).flatten(1)
    inter = (p & g).sum(dim=1).float()
    union = (p | g).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def miou(pred_masks: Tensor, gt_masks: Tensor) -> float:
    """Mean of :func:`mask_iou` over images with a non-empty GT mask (NaN when there are none)."""
    has_gt = gt_masks.flatten(1).any(dim=1)
    if not bool(has_gt.any()):
        return float("nan")
    return float(mask_iou(pred_masks, gt_masks)[has_gt.to(pred_masks.device)].mean())


def box_iou_best(pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """For each GT box ``(G, 4)`` the best IoU with any predicted box ``(P, 4)`` → float32 ``(G,)``.

    Uses ``torchvision.ops.box_iou`` (areas ``(x2-x1)*(y2-y1)``: the exclusive-edge convention);
    ``P = 0`` → zeros.
    """
    from torchvision.ops import box_iou

    g = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    p = torch.as_tensor(pred_boxes, dtype=torch.float32).reshape(-1, 4).to(g.device)
    if g.shape[0] == 0:
        return torch.zeros(0)
    if p.shape[0] == 0:
        return torch.zeros(g.shape[0], device=g.device)
    return box_iou(g, p).max(dim=1).values


def pointing_game(saliency: Tensor, gt_masks: Tensor) -> Tensor:
    """Is the most salient pixel inside the GT mask? → bool ``(B,)``.

    ``torch.argmax`` over the flattened map: ties go to the first maximum in raster order (row by
    row). A map whose maximum is not positive (e.g. all zeros) points nowhere: a miss.
    """
    _same_shape(saliency, gt_masks, "saliency, gt_masks")
    flat = saliency.flatten(1)
    idx = flat.argmax(dim=1)
    inside = gt_masks.to(saliency.device).flatten(1).gather(1, idx[:, None])[:, 0]
    return inside & (flat.max(dim=1).values > 0)


def energy_pointing(saliency: Tensor, gt_masks: Tensor) -> Tensor:
    """Share of the positive saliency mass inside the GT mask → float32 ``(B,)`` in [0, 1].

    ``sum(s+ · G) / sum(s+)``; an image with no positive saliency scores 0.
    """
    _same_shape(saliency, gt_masks, "saliency, gt_masks")
    s = saliency.float().clamp(min=0).flatten(1)
    g = gt_masks.to(saliency.device).flatten(1)
    total = s.sum(dim=1)
    inside = (s * g).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def iou_vs_tau(saliency_norm: Tensor, gt_masks: Tensor,
               taus: Sequence[float] = DEFAULT_TAUS) -> Tensor:
    """mIoU (as :func:`miou`) of ``saliency_norm > tau`` for each tau → float32 ``(T,)``.

    NaN everywhere when no image has a non-empty GT mask.
    """
    _same_shape(saliency_norm, gt_masks, "saliency_norm, gt_masks")
    gt = gt_masks.to(saliency_norm.device)
    has_gt = gt.flatten(1).any(dim=1)
    out = torch.full((len(taus),), float("nan"))
    if not bool(has_gt.any()):
        return out
    sal, gt = saliency_norm[has_gt], gt[has_gt]
    for i, tau in enumerate(taus):
        out[i] = mask_iou(threshold(sal, float(tau)), gt).mean().cpu()
    return out


def summarize(values, seed: int = 0, n_boot: int = 1000) -> dict:
    """``{"mean", "ci95", "n"}`` of per-image ``values`` (NaN entries dropped; bools count 0/1).

    ``ci95`` is the percentile bootstrap interval over images (:func:`tbkd_lib.stats.bootstrap_ci`),
    ``[lo, hi]``; ``mean``/``ci95`` are ``None`` when there is nothing to average.
    """
    v = values.detach().cpu().double().numpy() if isinstance(values, Tensor) else \
        np.asarray(values, dtype=np.float64)
    v = v.reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    lo, hi = bootstrap_ci(np.mean, v, n_boot=n_boot, seed=seed)
    ci = [lo, hi] if np.isfinite(lo) and np.isfinite(hi) else None
    return {"mean": float(v.mean()), "ci95": ci, "n": int(v.size)}


def paired_difference(a, b, seed: int = 0, n_boot: int = 1000) -> dict:
    """``mean(b − a)`` over images scored by both, with a paired bootstrap 95 % CI → ``{"diff", "ci95", "n"}``.

    ``a``, ``b``: per-image values (e.g. IoUs of the teacher and the student) for the SAME images in
    the same order; pairs where either is NaN are dropped. Resampling images jointly keeps what the
    two maps share (an easy image is easy for both), so the interval is narrower than the two
    unpaired intervals suggest. ``ci95`` excluding 0 means the difference is not resampling noise.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} and {b.size} values; expected one pair per image")
    d = (b - a)[np.isfinite(a) & np.isfinite(b)]
    if d.size == 0:
        return {"diff": None, "ci95": None, "n": 0}
    lo, hi = bootstrap_ci(np.mean, d, n_boot=n_boot, seed=seed)
    ci = [lo, hi] if np.isfinite(lo) and np.isfinite(hi) else None
    return {"diff": float(d.mean()), "ci95": ci, "n": int(d.size)}


def saliency_share_in_boxes(saliency: Tensor, boxes: Sequence[Tensor]) -> Tensor:
    """Shortcut reliance: the share of saliency inside ``boxes`` (one ``(K, 4)`` per image, e.g. the
    planted cue's box) → float32 ``(B,)``; :func:`energy_pointing` against the boxes' mask."""
    h, w = saliency.shape[-2:]
    return energy_pointing(saliency, gt_masks_from_boxes(boxes, h, w, device=saliency.device))


def prior_map(train_boxes: Sequence[Tensor], height: int, width: int) -> Tensor:
    """The prior-only baseline map → float32 ``(H, W)`` in [0, 1].

    Per pixel, the fraction of TRAIN TB images (entries with ≥ 1 box; empty entries are skipped)
    whose union of boxes covers that pixel. Used as the saliency of EVERY scored image: a model-free
    "where TB usually is" baseline. Raises ``ValueError`` when no entry has a box.
    """
    masks = [boxes_to_mask(torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4).cpu(), height, width)
             for b in train_boxes if len(b)]
    if not masks:
        raise ValueError("prior_map: no training image with a box")
    return torch.stack(masks).float().mean(dim=0)


def centre_box_saliency(height: int, width: int, frac: float = 0.5) -> Tensor:
    """A centred box covering ``frac`` of each side (1 inside, 0 outside) → float32 ``(H, W)``."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"centre_box_saliency: frac must be in (0, 1], got {frac}")
    bw, bh = frac * width, frac * height
    box = torch.tensor([[(width - bw) / 2, (height - bh) / 2, (width + bw) / 2, (height + bh) / 2]])
    return boxes_to_mask(box, height, width).float()

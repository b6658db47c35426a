"""The localization protocol, one named step per function (CheXlocalize, Saporta et al. 2022).

    saliency (B,H,W) ─normalize_saliency→ [0,1] ─threshold(tau)→ masks (B,H,W) bool ─boxes_from_masks→ boxes

All functions work on torch tensors, vectorised over the batch (``boxes_from_masks`` uses
``scipy.ndimage.label`` on the CPU, one call for the whole batch).

Conventions:

* **Threshold is strict**: ``mask = saliency_norm > tau`` (as ``cv2.THRESH_BINARY`` in CheXlocalize).
  An all-zero map therefore never produces a foreground, whatever ``tau >= 0``.
* **Boxes are xyxy pixels with exclusive x2/y2 edges**: a box ``[x1, y1, x2, y2]`` covers the
  pixels whose CENTRE ``(c + 0.5, r + 0.5)`` satisfies ``x1 <= c + 0.5 < x2`` and
  ``y1 <= r + 0.5 < y2``. For integer boxes this is columns ``x1 .. x2-1`` and rows ``y1 .. y2-1``,
  so ``(x2 - x1) * (y2 - y1)`` is the pixel count (the torchvision ``box_area`` convention);
  fractional boxes (resized radiologist boxes) rasterise by pixel centres.
* ``tau`` is a float in [0, 1] on the normalised map, or a per-image tensor ``(B,)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError

__all__ = ["normalize_saliency", "otsu_tau", "percentile_tau", "threshold", "apply_probability_cutoff",
           "boxes_from_masks", "boxes_to_mask", "gt_masks_from_boxes", "tune_tau", "resolve_tau",
           "TauChoice", "parse_tau_spec", "DEFAULT_TAUS"]

DEFAULT_TAUS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95


def _check_maps(saliency: Tensor, name: str = "saliency") -> None:
    if not isinstance(saliency, Tensor) or saliency.dim() != 3:
        shape = tuple(saliency.shape) if isinstance(saliency, Tensor) else type(saliency).__name__
        raise ValueError(f"{name}: expected (B, H, W), got {shape}")


def normalize_saliency(saliency: Tensor) -> Tensor:
    """Per-image min–max scaling: ``(s - min) / (max - min)`` → float32 ``(B, H, W)`` in [0, 1].

    A constant map becomes all zeros — no NaN. "Constant" allows float32 rounding: a map whose range is
    within 16 ulps of its magnitude (``max - min <= 16 * eps * max(|min|, |max|)``, e.g. a 1 x 1
    Grad-CAM upsampled bilinearly) is constant, not noise stretched to [0, 1]. Non-finite input is
    refused (``FloatingPointError``).
    """
    _check_maps(saliency)
    s = saliency.float()
    if not bool(torch.isfinite(s).all()):
        raise FloatingPointError("normalize_saliency: saliency contains NaN or inf")
    flat = s.flatten(1)
    lo = flat.min(dim=1).values[:, None, None] if flat.shape[1] else s.new_zeros(len(s), 1, 1)
    hi = flat.max(dim=1).values[:, None, None] if flat.shape[1] else s.new_zeros(len(s), 1, 1)
    span = hi - lo
    varies = span > 16 * torch.finfo(torch.float32).eps * torch.maximum(lo.abs(), hi.abs())
    out = torch.where(varies, (s - lo) / torch.where(varies, span, torch.ones_like(span)), torch.zeros_like(s))
    return out.clamp_(0.0, 1.0)


def otsu_tau(saliency_norm: Tensor, bins: int = 256) -> Tensor:
    """Otsu's threshold per image on a ``bins``-bin histogram of [0, 1] → float32 ``(B,)``.

    Bin ``k`` holds values in ``(k/bins, (k+1)/bins]`` (zero goes to bin 0), so the split "bins
    ``<= k`` vs ``> k``" is exactly ``s > (k+1)/bins``: the returned ``tau = (k*+1)/bins`` with ``k*``
    maximising the between-class variance (first maximiser on ties). A map with a single occupied bin
    (e.g. a constant map) has no split: ``tau = 1`` and the mask is empty.
    """
    _check_maps(saliency_norm, "saliency_norm")
    s = saliency_norm.float().flatten(1)
    b, n = s.shape
    idx = (torch.ceil(s * bins) - 1).clamp_(0, bins - 1).long()
    acc = torch.float32 if s.device.type == "mps" else torch.float64   # MPS has no float64
    counts = torch.zeros(b, bins, device=s.device, dtype=acc)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=acc))
    p = counts / max(n, 1)
    centres = (torch.arange(bins, device=s.device, dtype=acc) + 0.5) / bins
    omega = p.cumsum(1)                       # weight of class "<= k"
    mu = (p * centres).cumsum(1)              # first moment of class "<= k"
    mu_t = mu[:, -1:]
    denom = omega * (1.0 - omega)
    between = torch.where(denom > 1e-12, (mu_t * omega - mu) ** 2 / denom.clamp_min(1e-12),
                          torch.zeros_like(denom))
    k = between[:, : bins - 1].argmax(dim=1)
    tau = (k.to(acc) + 1.0) / bins
    degenerate = (counts > 0).sum(dim=1) <= 1
    tau = torch.where(degenerate, torch.ones_like(tau), tau)
    return tau.float()


def percentile_tau(saliency_norm: Tensor, q: float) -> Tensor:
    """The ``q``-th percentile (0–100, linear interpolation as ``numpy.percentile``) of each map
    → float32 ``(B,)``. With the strict threshold, about ``(100 - q)`` % of pixels are kept."""
    _check_maps(saliency_norm, "saliency_norm")
    if not 0.0 <= float(q) <= 100.0:
        raise ConfigError(f"percentile must be in [0, 100], got {q}")
    s = saliency_norm.float().flatten(1).sort(dim=1).values
    n = s.shape[1]
    pos = float(q) / 100.0 * (n - 1)
    lo, frac = int(np.floor(pos)), pos - np.floor(pos)
    hi = min(lo + 1, n - 1)
    return (s[:, lo] * (1.0 - frac) + s[:, hi] * frac).float()


def threshold(saliency_norm: Tensor, tau: float | Tensor) -> Tensor:
    """``masks = saliency_norm > tau`` → bool ``(B, H, W)``; ``tau`` a float or a ``(B,)`` tensor."""
    _check_maps(saliency_norm, "saliency_norm")
    t = torch.as_tensor(tau, dtype=torch.float32, device=saliency_norm.device)
    if t.dim() == 0:
        return saliency_norm > t
    if t.shape != (saliency_norm.shape[0],):
        raise ValueError(f"tau: expected a float or shape ({saliency_norm.shape[0]},), "
                         f"got {tuple(t.shape)}")
    return saliency_norm > t[:, None, None]


def apply_probability_cutoff(masks: Tensor, p_tb: Tensor | None, cutoff: float | None) -> Tensor:
    """Empty the masks of images whose ``p_tb (B,) < cutoff`` (CheXlocalize's probability cutoff:
    no segmentation when the classifier says "no TB"). ``cutoff=None`` → masks unchanged."""
    if cutoff is None:
        return masks
    if p_tb is None:
        raise ValueError("apply_probability_cutoff: a cutoff needs p_tb (B,)")
    p = torch.as_tensor(p_tb, device=masks.device).float().flatten()
    if p.shape[0] != masks.shape[0]:
        raise ValueError(f"p_tb: expected {masks.shape[0]} probabilities, got {p.shape[0]}")
    return masks & (p >= float(cutoff))[:, None, None]


def boxes_from_masks(masks: Tensor, min_area: int = 1, connectivity: int = 8) -> list[Tensor]:
    """One box per connected component of each mask → ``list`` of float32 ``(K, 4)`` xyxy.

    ``masks``: bool ``(B, H, W)``. Components come from ``scipy.ndimage.label`` (``connectivity``
    8: diagonal neighbours join, or 4); components with fewer than ``min_area`` PIXELS are dropped.
    Boxes use exclusive x2/y2 edges (module docstring) and are listed in label order (raster order
    of each component's first pixel). Returned on the masks' device.
    """
    from scipy import ndimage

    if masks.dim() != 3:
        raise ValueError(f"masks: expected (B, H, W), got {tuple(masks.shape)}")
    if connectivity not in (4, 8):
        raise ConfigError(f"connectivity must be 4 or 8, got {connectivity}")
    m = masks.detach().bool().cpu().numpy()
    plane = np.ones((3, 3), bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = plane                       # never connect across images
    labels, n = ndimage.label(m, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    out: list[list[list[float]]] = [[] for _ in range(m.shape[0])]
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or sizes[lab] < min_area:
            continue
        b, rows, cols = sl
        out[b.start].append([cols.start, rows.start, cols.stop, rows.stop])
    return [torch.tensor(bx, dtype=torch.float32, device=masks.device).reshape(-1, 4) for bx in out]


def _box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """(K, 4) → bool (K, H, W), pixel-centre rule."""
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    cx = torch.arange(width, dtype=torch.float32, device=b.device) + 0.5
    cy = torch.arange(height, dtype=torch.float32, device=b.device) + 0.5
    in_x = (cx[None, :] >= b[:, 0:1]) & (cx[None, :] < b[:, 2:3])     # (K, W)
    in_y = (cy[None, :] >= b[:, 1:2]) & (cy[None, :] < b[:, 3:4])     # (K, H)
    return in_y[:, :, None] & in_x[:, None, :]


def boxes_to_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """Union of ``boxes`` (K, 4) xyxy → bool ``(H, W)`` (pixel-centre rule; K = 0 → all False)."""
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if b.shape[0] == 0:
        return torch.zeros(height, width, dtype=torch.bool, device=b.device)
    return _box_masks(b, height, width).any(dim=0)


def gt_masks_from_boxes(boxes: Sequence[Tensor], height: int, width: int,
                        device: torch.device | str | None = None) -> Tensor:
    """Ground-truth masks: one union-of-boxes mask per image → bool ``(B, H, W)``."""
    masks = [boxes_to_mask(torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4), height, width)
             for b in boxes]
    if not masks:
        return torch.zeros(0, height, width, dtype=torch.bool, device=device)
    out = torch.stack([m.cpu() for m in masks])
    return out.to(device) if device is not None else out


def tune_tau(saliency_norm: Tensor, gt_masks: Tensor,
             taus: Sequence[float] = DEFAULT_TAUS) -> tuple[float, Tensor]:
    """The ``tau`` of ``taus`` maximising mIoU over THESE images → ``(best_tau, curve (T,))``.

    ``curve[t]`` is :func:`locmetrics.iou_vs_tau`: the mean per-image IoU over the images whose GT
    mask is not empty. Ties go to the smallest tau. Only ever call this on a calibration set, never
    on the split you score. Raises ``ValueError`` if no image has a ground-truth box.
    """
    from .locmetrics import iou_vs_tau

    curve = iou_vs_tau(saliency_norm, gt_masks, taus)
    if not bool(torch.isfinite(curve).any()):
        raise ValueError("tune_tau: no calibration image has a ground-truth box")
    best = int(torch.nan_to_num(curve, nan=-1.0).argmax())
    return float(taus[best]), curve


@dataclass(frozen=True)
class TauChoice:
    """The threshold the protocol uses: ``tau`` float32 ``(B,)`` (one per scored image), a display
    value ``value`` (the fixed/tuned tau, or the mean of per-image taus), a human ``source`` and, when
    tuned, the calibration ``curve`` ``(T,)`` over ``taus``."""

    tau: Tensor
    value: float
    source: str
    curve: Tensor | None = None
    taus: tuple[float, ...] | None = None


_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")


def parse_tau_spec(spec) -> tuple[str, float | None]:
    """``0.3`` → ("fixed", 0.3); ``"otsu"``; ``"p90"`` → ("percentile", 90.0); ``"auto"``."""
    if isinstance(spec, bool):
        raise ConfigError(f"tau: expected a float, 'otsu', 'pNN' or 'auto', got {spec!r}")
    if isinstance(spec, (int, float)):
        if not 0.0 <= float(spec) <= 1.0:
            raise ConfigError(f"tau: a fixed tau must be in [0, 1], got {spec}")
        return "fixed", float(spec)
    if spec == "otsu":
        return "otsu", None
    if spec == "auto":
        return "auto", None
    match = _PERCENTILE.match(str(spec))
    if match and 0.0 <= float(match.group(1)) <= 100.0:
        return "percentile", float(match.group(1))
    raise ConfigError(f"tau: expected a float in [0, 1], 'otsu', 'pNN' (percentile, e.g. 'p90') or "
                      f"'auto', got {spec!r}")


def resolve_tau(spec, saliency_norm: Tensor, *, taus: Sequence[float] = DEFAULT_TAUS,
                calibration: tuple[Tensor, Tensor] | None = None) -> TauChoice:
    """Fix ``tau`` for the scored maps ``saliency_norm (B, H, W)`` WITHOUT looking at their boxes.

    ``spec``: a float (fixed), ``"otsu"`` (per image), ``"pNN"`` (per-image NN-th percentile) or
    ``"auto"``: tuned by :func:`tune_tau` on ``calibration = (calibration_saliency_norm (M, H, W),
    calibration_gt_masks (M, H, W))`` — a different set of images; ``"auto"`` without calibration is
    a ``ValueError``.
    """
    kind, value = parse_tau_spec(spec)
    b = saliency_norm.shape[0]
    dev = saliency_norm.device
    if kind == "fixed":
        return TauChoice(torch.full((b,), value, device=dev), value, "fixed")
    if kind == "otsu":
        t = otsu_tau(saliency_norm)
        return TauChoice(t, float(t.mean()) if b else float("nan"), "otsu (per image; mean shown)")
    if kind == "percentile":
        t = percentile_tau(saliency_norm, value)
        return TauChoice(t, float(t.mean()) if b else float("nan"),
                         f"percentile p{value:g} (per image; mean shown)")
    if calibration is None:
        raise ValueError("tau='auto' tunes tau on a calibration set (e.g. TRAIN TB images); "
                         "pass calibration=(saliency_norm, gt_masks) — the scored split is never used")
    cal_sal, cal_gt = calibration
    best, curve = tune_tau(cal_sal, cal_gt, taus)
    n_cal = int(cal_gt.flatten(1).any(dim=1).sum())
    return TauChoice(torch.full((b,), best, device=dev), best,
                     f"tuned on calibration split ({n_cal} images)", curve, tuple(float(t) for t in taus))

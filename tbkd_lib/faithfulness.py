"""Deletion and insertion curves (Petsiuk, Das & Saenko 2018, "RISE", section 4.1).

Does the map point at what the model uses? Pixels are ranked by saliency (most salient first, ties
in raster order) and changed in ``steps`` equal fractions of the image:

* **deletion**: start from the image, replace the top ``i/steps`` of pixels by a baseline (black by
  default, as RISE). A faithful map makes ``p(target)`` fall fast → LOW area under the curve.
* **insertion**: start from the baseline (a blurred copy by default, as RISE), put the top pixels
  back. A faithful map makes ``p(target)`` rise fast → HIGH area.

``p(target)`` is the softmax probability of the target logit. At step ``i`` exactly
``floor(i · H·W / steps)`` pixels are changed, so step 0 is the untouched start and step ``steps``
the fully changed image. Departure: the blur baseline uses ``sigma = H/32`` pixels (RISE's
11-tap kernel is ≈ 1 px at 224 px and leaves most of the structure in place).
``model.eval()`` is called first and the model is left in eval mode.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .localize import gaussian_blur

__all__ = ["deletion_curve", "insertion_curve", "auc", "perturbation_curve", "saliency_ranks",
           "prediction_under_noise"]


def saliency_ranks(saliency: Tensor) -> Tensor:
    """Rank of each pixel, 0 = most salient → int64 ``(B, H*W)`` (ties: earlier pixel first)."""
    flat = saliency.detach().flatten(1).float()
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def _baseline(images: Tensor, baseline: str, blur_sigma: float | None) -> Tensor:
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else images.shape[-2] / 32
        return gaussian_blur(images, sigma)
    raise ConfigError(f"baseline must be 'zero' or 'blur', got {baseline!r}")


@torch.no_grad()
def perturbation_curve(model: nn.Module, images: Tensor, saliency: Tensor, targets: Tensor,
                       mode: str, steps: int = 20, baseline: str = "zero",
                       blur_sigma: float | None = None) -> Tensor:
    """``p(target)`` along a deletion (``mode="deletion"``) or insertion path → float32 ``(B, steps+1)``.

    ``images`` float32 ``(B, 1, H, W)``; ``saliency`` ``(B, H, W)``; ``targets`` int64 ``(B,)``.
    One forward pass of the B perturbed images per step.
    """
    if mode not in ("deletion", "insertion"):
        raise ConfigError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if images.dim() != 4 or saliency.shape != (images.shape[0],) + tuple(images.shape[-2:]):
        raise ValueError(f"images (B, 1, H, W) {tuple(images.shape)} and saliency (B, H, W) "
                         f"{tuple(saliency.shape)} do not match")
    if not isinstance(targets, Tensor) or targets.shape != (images.shape[0],):
        raise ValueError(f"targets: expected int64 ({images.shape[0]},), got "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    model.eval()
    b, c, h, w = images.shape
    n = h * w
    ranks = saliency_ranks(saliency.to(images.device)).view(b, 1, h, w)
    base = _baseline(images, baseline, blur_sigma)
    start, end = (images, base) if mode == "deletion" else (base, images)
    targets = targets.to(images.device).long()
    probs = []
    for i in range(steps + 1):
        changed = ranks < (i * n) // steps                     # (B, 1, H, W)
        x = torch.where(changed, end, start)
        p = torch.softmax(model(x).float(), dim=1)
        probs.append(p.gather(1, targets[:, None])[:, 0])
    return torch.stack(probs, dim=1)


def deletion_curve(model: nn.Module, images: Tensor, saliency: Tensor, targets: Tensor,
                   steps: int = 20, baseline: str = "zero", blur_sigma: float | None = None) -> Tensor:
    """Deletion curve → ``(B, steps+1)``; most salient pixels replaced by ``baseline`` first."""
    return perturbation_curve(model, images, saliency, targets, "deletion", steps, baseline, blur_sigma)


def insertion_curve(model: nn.Module, images: Tensor, saliency: Tensor, targets: Tensor,
                    steps: int = 20, baseline: str = "blur", blur_sigma: float | None = None) -> Tensor:
    """Insertion curve → ``(B, steps+1)``; from ``baseline``, most salient pixels restored first."""
    return perturbation_curve(model, images, saliency, targets, "insertion", steps, baseline, blur_sigma)


def auc(curve: Tensor) -> Tensor:
    """Trapezoid area under ``curve (B, S+1)`` sampled at fractions ``0, 1/S, …, 1`` → ``(B,)``."""
    if curve.dim() != 2 or curve.shape[1] < 2:
        raise ValueError(f"curve: expected (B, steps+1) with steps >= 1, got {tuple(curve.shape)}")
    return torch.trapezoid(curve.float(), dx=1.0 / (curve.shape[1] - 1), dim=1)


@torch.no_grad()
def prediction_under_noise(model: nn.Module, images: Tensor, targets: Tensor, stdevs=(0.0, 0.1),
                           seed: int = 0, batch_size: int = 16) -> Tensor:
    """Mean ``p(target)`` over ``images`` with Gaussian noise of each std in ``stdevs`` added → ``(S,)``.

    A sanity check for SmoothGrad (Smilkov et al. 2017), which averages gradients over exactly such
    noisy copies: when ``p(target)`` collapses under that noise, the copies are out of distribution
    and the averaged gradients explain a different decision. ``images`` float32 ``(B, 1, H, W)`` in
    [0, 1] (the noisy copies are NOT clipped, as in Captum's NoiseTunnel); ``targets`` int64 ``(B,)``;
    the noise is drawn on the CPU from a generator seeded with ``seed`` afresh for each std, so every
    std scales the same draws (common random numbers) and results are reproducible.
    """
    if images.dim() != 4 or not isinstance(targets, Tensor) or targets.shape != (images.shape[0],):
        raise ValueError(f"images (B, 1, H, W) and targets (B,) expected, got {tuple(images.shape)} and "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    model.eval()
    out = []
    for sd in stdevs:
        if float(sd) < 0:
            raise ValueError(f"stdevs must be >= 0, got {sd}")
        gen = torch.Generator().manual_seed(int(seed))
        total = 0.0
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
            p = torch.softmax(model(x + float(sd) * noise).float(), dim=1)
            total += float(p.gather(1, targets[i:i + batch_size, None].to(x.device).long()).sum())
        out.append(total / max(len(images), 1))
    return torch.tensor(out, dtype=torch.float32)

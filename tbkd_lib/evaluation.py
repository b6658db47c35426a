"""Localization evaluation: attribution → protocol → scores, for one model and one method.

``evaluate_localization(model, (images, boxes[, p_tb]), method, cfg, calibration=...)`` runs, in
this order (each step a function of :mod:`localize`, :mod:`protocol`, :mod:`locmetrics`,
:mod:`faithfulness`):

1. saliency of the TB logit for every scored image (:func:`compute_saliency`, batched);
2. per-image min–max normalisation;
3. ``tau`` is FIXED — from the config (a float), from the maps alone (``"otsu"``, ``"pNN"``), or
   tuned on a DIFFERENT calibration set (``"auto"``, e.g. TRAIN TB images). The scored boxes have not
   been read yet (``tests/test_evaluation.py`` checks this with a tripwire);
4. only now the scored boxes are read: masks ``saliency_norm > tau`` (optionally emptied below a
   p(TB) cutoff), scored against the union-of-boxes ground truth;
5. deletion/insertion AUCs (optional).

Scored images: those with ≥ 1 GT box (``n_images``); images without a box are attributed (their
boxes are unknown at that point) but left out of every average. Everything returned is JSON-able
(``None`` in place of NaN). The model is put in eval mode (``model.eval()``) and left there.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .faithfulness import auc, deletion_curve, insertion_curve, prediction_under_noise
from .io import to_jsonable
from .localize import METHODS, amp_dtype_for, attribute, fast_path
from .locmetrics import (box_iou_best, energy_pointing, iou_vs_tau, mask_iou, pointing_game,
                         summarize)
from .protocol import (DEFAULT_TAUS, TauChoice, apply_probability_cutoff, boxes_from_masks,
                       gt_masks_from_boxes, normalize_saliency, parse_tau_spec, resolve_tau, threshold)

__all__ = ["LocalizeConfig", "compute_saliency", "evaluate_localization", "evaluate_prior_baseline",
           "tb_probabilities"]


@dataclass(frozen=True)
class LocalizeConfig:
    """How localization is scored (saved as JSON next to every result).

    ``methods``: names in :data:`tbkd_lib.localize.METHODS`. ``tau``: a float in [0, 1], ``"otsu"``,
    ``"pNN"`` (per-image percentile, e.g. ``"p90"``) or ``"auto"`` (tuned over ``taus`` on a
    calibration set). ``prob_cutoff``: empty the mask when p(TB) is below it (``None``: never).
    ``n_boot``/``seed``: bootstrap CIs. ``batch_size``: images per attribution call.
    ``method_kwargs``: ``{method: {option: value}}`` passed to :func:`attribute` (a tuple of
    ``(method, {…})`` pairs is accepted and turned into a dict), e.g.
    ``{"ig": {"n_steps": 16}, "saliency": {"smooth_sigma": 0}}``. ``faithfulness``: compute
    deletion/insertion AUCs with ``faithfulness_steps`` steps, on at most the first
    ``faithfulness_max_images`` scored images (None: all; each costs 2 × (steps + 1) forward passes per
    method). ``max_images``: use at most the first
    N scored (and calibration) images — a run budget for smoke tests. ``min_box_area``: components
    smaller than this many pixels give no predicted box. ``amp``: ``"none"`` (fp32, the default),
    ``"bf16"`` or ``"auto"`` — attribution and faithfulness passes in bf16 autocast with channels-last
    weights (:func:`tbkd_lib.localize.fast_path`; 3.1–3.7× faster on the project's CPU, maps
    correlating ≥ 0.999 with fp32).
    (Not hashable: ``method_kwargs`` is a dict.)
    """

    methods: tuple[str, ...] = ("gradcam", "guided_gradcam", "ig", "smoothgrad", "occlusion", "saliency")
    tau: float | str = "auto"
    taus: tuple[float, ...] = DEFAULT_TAUS
    prob_cutoff: float | None = None
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 16
    method_kwargs: dict = field(default_factory=dict)
    faithfulness: bool = True
    faithfulness_steps: int = 10
    faithfulness_max_images: int | None = None
    max_images: int | None = None
    min_box_area: int = 1
    amp: str = "none"

    def __post_init__(self):
        if isinstance(self.methods, str):
            object.__setattr__(self, "methods", (self.methods,))
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"LocalizeConfig.methods: unknown {unknown}; known: {sorted(METHODS)}")
        parse_tau_spec(self.tau)
        taus = tuple(float(t) for t in self.taus)
        if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
            raise ConfigError(f"LocalizeConfig.taus: expected a non-empty list in [0, 1], got {self.taus}")
        object.__setattr__(self, "taus", taus)
        mk = self.method_kwargs
        if isinstance(mk, (tuple, list)):
            mk = {name: dict(kw) for name, kw in mk}
        if not isinstance(mk, Mapping):
            raise ConfigError(f"LocalizeConfig.method_kwargs: expected {{method: {{option: value}}}}, "
                              f"got {type(mk).__name__}")
        mk = {str(k): dict(v) for k, v in mk.items()}
        unknown = sorted(set(mk) - set(METHODS))
        if unknown:
            raise ConfigError(f"LocalizeConfig.method_kwargs: unknown method(s) {unknown}")
        for name, kw in mk.items():
            bad = sorted(set(kw) - set(METHODS[name].kwargs) - {"smooth_sigma"})
            if bad:
                raise ConfigError(f"LocalizeConfig.method_kwargs[{name!r}]: unknown option(s) {bad}; "
                                  f"known: {sorted(METHODS[name].kwargs) + ['smooth_sigma']}")
        object.__setattr__(self, "method_kwargs", mk)
        if self.prob_cutoff is not None and not 0.0 <= float(self.prob_cutoff) <= 1.0:
            raise ConfigError(f"LocalizeConfig.prob_cutoff: expected None or [0, 1], got {self.prob_cutoff}")
        for name, low in (("batch_size", 1), ("faithfulness_steps", 1), ("n_boot", 0), ("min_box_area", 1)):
            if int(getattr(self, name)) < low:
                raise ConfigError(f"LocalizeConfig.{name}: expected >= {low}, got {getattr(self, name)}")
        amp_dtype_for(self.amp, "cpu")  # validates the name
        if self.faithfulness_max_images is not None and int(self.faithfulness_max_images) < 1:
            raise ConfigError(f"LocalizeConfig.faithfulness_max_images: expected None or >= 1, got "
                              f"{self.faithfulness_max_images}")
        if self.max_images is not None and int(self.max_images) < 1:
            raise ConfigError(f"LocalizeConfig.max_images: expected None or >= 1, got {self.max_images}")

    def kwargs_for(self, method: str) -> dict:
        """The options :func:`attribute` gets for ``method`` (a copy)."""
        return dict(self.method_kwargs.get(method, {}))


# --------------------------------------------------------------------------------------------------
def _tb_target(model: nn.Module, images: Tensor) -> int:
    """TB is the last logit: one forward pass of one image tells how many logits there are."""
    model.eval()
    with torch.no_grad():
        return int(model(images[:1]).shape[1]) - 1


@torch.no_grad()
def tb_probabilities(model: nn.Module, images: Tensor, target: int, batch_size: int = 16,
                     amp: str = "none") -> Tensor:
    """Softmax probability of class ``target`` for each image → float32 ``(N,)`` on the CPU."""
    model.eval()
    with fast_path(model, amp):
        out = [torch.softmax(model(images[i:i + batch_size]).float(), dim=1)[:, target].cpu()
               for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def compute_saliency(model: nn.Module, images: Tensor, targets: Tensor, method: str,
                     cfg: LocalizeConfig) -> Tensor:
    """:func:`attribute` over ``images (N, 1, H, W)`` in chunks of ``cfg.batch_size`` with
    ``cfg.kwargs_for(method)`` → float32 ``(N, H, W)`` on the images' device; in bf16 autocast with
    channels-last weights when ``cfg.amp`` asks for it."""
    kwargs = cfg.kwargs_for(method)
    with fast_path(model, cfg.amp):
        chunks = [attribute(model, images[i:i + cfg.batch_size], targets[i:i + cfg.batch_size], method,
                            **kwargs) for i in range(0, len(images), cfg.batch_size)]
    if not chunks:
        return torch.zeros((0,) + tuple(images.shape[-2:]), device=images.device)
    return torch.cat(chunks)


def _unpack(split, name: str, limit: int | None):
    if not isinstance(split, (tuple, list)) or len(split) not in (2, 3):
        raise ValueError(f"{name}: expected (images (N,1,H,W), boxes list of (K,4)[, p_tb (N,)])")
    images, boxes = split[0], split[1]
    p_tb = split[2] if len(split) == 3 else None
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{name}: images must be a float tensor (N, 1, H, W), got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if len(boxes) != len(images):  # the count only; box coordinates are not read here
        raise ValueError(f"{name}: {len(images)} images but {len(boxes)} box lists")
    if p_tb is not None and len(p_tb) != len(images):
        raise ValueError(f"{name}: {len(images)} images but {len(p_tb)} probabilities")
    if limit is not None and len(images) > limit:
        images = images[:limit]
        boxes = _Head(boxes, limit)
        p_tb = p_tb[:limit] if p_tb is not None else None
    return images, boxes, p_tb


class _Head(Sequence):
    """The first ``n`` entries of a sequence, without touching them until asked."""

    def __init__(self, seq, n):
        self.seq, self.n = seq, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.seq[i % self.n]


def _read_boxes(boxes: Sequence) -> list[Tensor]:
    return [torch.as_tensor(boxes[i], dtype=torch.float32).reshape(-1, 4).cpu() for i in range(len(boxes))]


def _score(saliency: Tensor, saliency_norm: Tensor, choice: TauChoice, boxes: Sequence,
           cfg: LocalizeConfig, p_tb: Tensor | None) -> tuple[dict, dict]:
    """Steps 4–: read the scored boxes (tau is fixed by now) and compute every score."""
    h, w = saliency.shape[-2:]
    gt_boxes = _read_boxes(boxes)
    gt = gt_masks_from_boxes(gt_boxes, h, w).to(saliency.device)
    masks = threshold(saliency_norm, choice.tau)
    masks = apply_probability_cutoff(masks, p_tb, cfg.prob_cutoff)
    keep = gt.flatten(1).any(dim=1)
    ious = mask_iou(masks, gt)[keep]
    hits = pointing_game(saliency, gt)[keep]
    energy = energy_pointing(saliency, gt)[keep]
    kept = torch.nonzero(keep).flatten().tolist()
    pred_boxes = boxes_from_masks(masks[keep], min_area=cfg.min_box_area)
    best = [box_iou_best(pb.cpu(), gt_boxes[i]) for pb, i in zip(pred_boxes, kept)]
    best = torch.cat(best) if best else torch.zeros(0)
    m = summarize(ious, cfg.seed, cfg.n_boot)
    hr = summarize(hits.float(), cfg.seed, cfg.n_boot)
    ep = summarize(energy, cfg.seed, cfg.n_boot)
    curve = iou_vs_tau(saliency_norm, gt, cfg.taus)
    result = {
        "miou": m["mean"], "miou_ci95": m["ci95"],
        "box_iou": float(best.mean()) if best.numel() else None,
        "hit_rate": hr["mean"], "hit_rate_ci95": hr["ci95"],
        "energy_pointing": ep["mean"], "energy_pointing_ci95": ep["ci95"],
        "tau": choice.value, "tau_source": choice.source,
        "n_images": int(keep.sum()), "n_attributed": int(len(saliency)), "n_boxes": int(best.numel()),
        # in scored-image order: paired comparisons (student vs teacher) resample these together
        "per_image_iou": ious.tolist(),
        "pred_boxes_per_image": (sum(len(b) for b in pred_boxes) / len(pred_boxes)) if pred_boxes else None,
        "prob_cutoff": cfg.prob_cutoff,
        # Oracle curve on the SCORED split, for plots only; never used to choose tau.
        "iou_vs_tau": {"tau": list(cfg.taus), "miou": curve.tolist()},
    }
    result["calibration_iou_vs_tau"] = (None if choice.curve is None else
                                        {"tau": list(choice.taus), "miou": choice.curve.tolist()})
    maps = {"saliency": saliency, "saliency_norm": saliency_norm, "masks": masks, "gt_masks": gt,
            "tau": choice.tau, "scored": keep, "pred_boxes": pred_boxes}
    return result, maps


def evaluate_localization(model: nn.Module, scored, method: str, cfg: LocalizeConfig,
                          calibration=None, *, target: int | None = None,
                          return_maps: bool = False):
    """Score ``method``'s maps of the TB logit against radiologists' boxes → JSON-able ``dict``.

    ``scored``: ``(images float32 (N, 1, H, W) in [0, 1], boxes: sequence of N (K, 4) xyxy in image
    pixels[, p_tb (N,)])`` — the split you report. ``calibration``: the same shape for a DIFFERENT set
    of images (e.g. TRAIN TB images); required when ``cfg.tau == "auto"`` (``ValueError`` otherwise),
    unused for other taus. ``target``: the class to explain (default: the last logit = TB).

    Keys: ``miou`` (mean per-image mask IoU over scored images with ≥ 1 box) and ``miou_ci95``;
    ``box_iou`` (mean over GT boxes of the best IoU with a predicted component box); ``hit_rate``
    (pointing game) and ``hit_rate_ci95``; ``energy_pointing`` and ``_ci95``; ``tau``, ``tau_source``;
    ``n_images``; ``iou_vs_tau`` ``{"tau": [...], "miou": [...]}`` (oracle curve on the scored split,
    for plots; tau is fixed before it is computed); ``deletion_auc``/``insertion_auc`` (+ ``_ci95``,
    and ``faithfulness_n_images``, the films they average) when ``cfg.faithfulness``; ``seconds``
    (wall time of the whole call, calibration included) and ``seconds_per_image`` (attribution time
    on the scored images / number attributed).
    Maps are computed on the images' device; ``return_maps=True`` also returns the tensors
    (``saliency``, ``saliency_norm``, ``masks``, ``gt_masks``, ``tau``, ``scored``, ``pred_boxes``).
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise ConfigError(f"unknown attribution method {method!r}; expected one of {sorted(METHODS)}")
    kind, _ = parse_tau_spec(cfg.tau)
    if kind == "auto" and calibration is None:
        raise ValueError("tau='auto' needs a calibration set (e.g. TRAIN TB images with their boxes); "
                         "the scored split's boxes are never used to choose tau")
    images, boxes, p_tb = _unpack(scored, "scored", cfg.max_images)
    if len(images) == 0:
        raise ValueError("scored: no images")
    model.eval()
    tb = _tb_target(model, images) if target is None else int(target)
    targets = torch.full((len(images),), tb, dtype=torch.long, device=images.device)

    t0 = time.perf_counter()
    saliency = compute_saliency(model, images, targets, method, cfg)
    attribution_seconds = time.perf_counter() - t0
    saliency_norm = normalize_saliency(saliency)

    cal = None
    if kind == "auto":
        cal_images, cal_boxes, _ = _unpack(calibration, "calibration", cfg.max_images)
        cal_targets = torch.full((len(cal_images),), tb, dtype=torch.long, device=cal_images.device)
        cal_norm = normalize_saliency(compute_saliency(model, cal_images, cal_targets, method, cfg))
        cal_gt = gt_masks_from_boxes(_read_boxes(cal_boxes), *cal_norm.shape[-2:]).to(cal_norm.device)
        cal = (cal_norm, cal_gt)
    choice = resolve_tau(cfg.tau, saliency_norm, taus=cfg.taus, calibration=cal)  # tau fixed here

    if cfg.prob_cutoff is not None and p_tb is None:
        p_tb = tb_probabilities(model, images, tb, cfg.batch_size, cfg.amp)
    if p_tb is not None:
        p_tb = torch.as_tensor(p_tb, dtype=torch.float32).flatten()
    result, maps = _score(saliency, saliency_norm, choice, boxes, cfg, p_tb)

    result.update({"method": method, "target": tb, "deletion_auc": None, "deletion_auc_ci95": None,
                   "insertion_auc": None, "insertion_auc_ci95": None})
    if cfg.faithfulness and result["n_images"]:
        idx = torch.nonzero(maps["scored"]).flatten().to(images.device)[:cfg.faithfulness_max_images]
        dels, ins = [], []
        with fast_path(model, cfg.amp):
            for i in range(0, len(idx), cfg.batch_size):
                j = idx[i:i + cfg.batch_size]
                x, s, t = images[j], saliency[j], targets[j]
                dels.append(auc(deletion_curve(model, x, s, t, steps=cfg.faithfulness_steps)).cpu())
                ins.append(auc(insertion_curve(model, x, s, t, steps=cfg.faithfulness_steps)).cpu())
        d = summarize(torch.cat(dels), cfg.seed, cfg.n_boot)
        n = summarize(torch.cat(ins), cfg.seed, cfg.n_boot)
        result.update({"deletion_auc": d["mean"], "deletion_auc_ci95": d["ci95"],
                       "insertion_auc": n["mean"], "insertion_auc_ci95": n["ci95"],
                       "faithfulness_n_images": int(len(idx))})
    if method == "smoothgrad":
        # SmoothGrad explains the model on noisy copies: say how the model treats them
        sd = float(cfg.kwargs_for("smoothgrad").get("stdevs", METHODS["smoothgrad"].kwargs["stdevs"]))
        with fast_path(model, cfg.amp):
            clean, noisy = prediction_under_noise(model, images, targets, (0.0, sd), seed=cfg.seed,
                                                  batch_size=cfg.batch_size).tolist()
        result["noise_check"] = {"stdevs": sd, "p_target_clean": clean, "p_target_noisy": noisy}
    result["seconds"] = time.perf_counter() - t_start
    result["seconds_per_image"] = attribution_seconds / len(images)
    result = to_jsonable(result)
    return (result, maps) if return_maps else result


def evaluate_prior_baseline(prior: Tensor, scored_boxes: Sequence, cfg: LocalizeConfig,
                            calibration_boxes: Sequence | None = None, *, return_maps: bool = False,
                            name: str = "prior"):
    """The prior-only baseline scored like a method → the :func:`evaluate_localization` dict.

    ``prior``: float ``(H, W)`` (e.g. :func:`tbkd_lib.locmetrics.prior_map` of TRAIN boxes) used as
    the saliency of every scored image; ``scored_boxes``: one ``(K, 4)`` per scored image.
    ``tau="auto"`` is tuned on ``calibration_boxes`` (the prior against THOSE boxes), exactly as for a
    model; other taus need no calibration. No model → faithfulness keys are ``None``. ``name`` goes in
    the ``method`` field (e.g. ``"centre_box"`` for :func:`tbkd_lib.locmetrics.centre_box_saliency`).
    """
    t_start = time.perf_counter()
    prior = torch.as_tensor(prior, dtype=torch.float32)
    if prior.dim() != 2:
        raise ValueError(f"prior: expected (H, W), got {tuple(prior.shape)}")
    kind, _ = parse_tau_spec(cfg.tau)
    if kind == "auto" and calibration_boxes is None:
        raise ValueError("tau='auto' needs calibration_boxes (e.g. TRAIN TB boxes)")
    n = len(scored_boxes) if cfg.max_images is None else min(len(scored_boxes), int(cfg.max_images))
    if n == 0:
        raise ValueError("scored_boxes: no images")
    boxes = _Head(scored_boxes, n)
    h, w = prior.shape
    saliency = prior.clamp(min=0).expand(n, h, w).contiguous()
    saliency_norm = normalize_saliency(saliency)
    cal = None
    if kind == "auto":
        m = len(calibration_boxes) if cfg.max_images is None else min(len(calibration_boxes),
                                                                       int(cfg.max_images))
        cal_gt = gt_masks_from_boxes(_read_boxes(_Head(calibration_boxes, m)), h, w)
        cal = (normalize_saliency(prior.clamp(min=0).expand(m, h, w).contiguous()), cal_gt)
    choice = resolve_tau(cfg.tau, saliency_norm, taus=cfg.taus, calibration=cal)
    no_cutoff = dataclasses.replace(cfg, prob_cutoff=None)
    result, maps = _score(saliency, saliency_norm, choice, boxes, no_cutoff, None)
    result.update({"method": name, "target": None, "deletion_auc": None, "deletion_auc_ci95": None,
                   "insertion_auc": None, "insertion_auc_ci95": None,
                   "seconds": time.perf_counter() - t_start, "seconds_per_image": 0.0})
    result = to_jsonable(result)
    return (result, maps) if return_maps else result

"""Train the student from the teacher by knowledge distillation: Hinton KD, attention transfer, CAM matching.

The paper (Shawkat, Hasan & Hasan, arXiv 2512.11057) distils a ResNet50 teacher trained on TBX11K image
labels into a student; its code and exact loss are not public. We implement three plausible variants
(``DistillConfig.kd``):

* ``"hinton"`` (Hinton, Vinyals & Dean 2015)::

      loss = alpha * T^2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T))
             + (1 - alpha) * CE(student_logits, labels)

  KL with ``reduction="batchmean"`` (the true KL per image, averaged over images). The ``T^2`` keeps the
  soft-target gradients at the same scale as the hard-label ones when ``T`` changes. OUR defaults:
  ``temperature = 4.0``, ``alpha = 0.7`` (common choices, not the paper's, which are not public).
* ``"at"``: Hinton + ``beta`` x attention transfer (Zagoruyko & Komodakis 2017) on ``at_layers``.
* ``"cam"``: Hinton + ``beta`` x CAM matching: the student's class activation map of the TRUE class is
  pulled towards the teacher's (our variant, aimed at localization).

Teacher-logit caching (``cache_teacher_logits=True``, ``kd="hinton"`` only): the teacher's logits are
computed ONCE on the un-augmented train images and saved as ``run_dir/teacher_logits.pt``; each step then
looks them up by dataset index instead of running the teacher. This is an approximation: the student sees
an augmented image while the soft target comes from the un-augmented one (the augmentation here is mild:
+-5 deg, 5 % shift, 10 % scale, brightness/contrast); ``cache_teacher_logits=False`` runs the teacher
live on exactly the student's batch. AT and CAM need the teacher's feature maps and always run it live.

``distill(config, data, teacher, run_dir)`` writes the same files as ``fit`` (checkpoints with
``kind="student"``) and adds the teacher's validation metrics to the summary (``teacher_val``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .config import replace_config
from .data.records import class_names
from .errors import ConfigError
from .models import TBClassifier, build_model, capture_features
from .train import RunContext, StepLoss, TrainConfig, predict_logits, run_training

__all__ = ["DistillConfig", "hinton_kd_loss", "attention_map", "attention_transfer_loss",
           "class_activation_maps", "cam_matching_loss", "KDLoss", "distill", "compute_teacher_logits"]

KD_KINDS = ("hinton", "at", "cam")


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """:class:`TrainConfig` of the student plus the distillation settings.

    ``student_arch``: the student's architecture (None -> the teacher's: a "born-again" network); ``arch``
    is an alias kept for the shared fields (set one of them). ``kd``: hinton | at | cam. ``temperature``
    (T), ``alpha`` (weight of the KD term; 1 - alpha weighs the label cross-entropy), ``beta`` (weight of
    the AT / CAM term, added on top of Hinton), ``at_layers`` (same names in teacher and student),
    ``cam_norm`` ("max": each CAM divided by its maximum; "sum": by its sum), ``cam_distance``
    ("mse" | "l1"), ``cache_teacher_logits``.
    """

    arch: str | None = None
    kd: str = "hinton"
    temperature: float = 4.0
    alpha: float = 0.7
    beta: float = 1.0
    at_layers: tuple[str, ...] = ("backbone.layer2", "backbone.layer3", "backbone.layer4")
    cam_norm: str = "max"
    cam_distance: str = "mse"
    student_arch: str | None = None
    cache_teacher_logits: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.kd not in KD_KINDS:
            raise ConfigError(f"DistillConfig.kd must be one of {KD_KINDS}; got {self.kd!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"DistillConfig.alpha must be in [0, 1]; got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"DistillConfig.temperature must be > 0; got {self.temperature}")
        if self.cam_norm not in ("max", "sum") or self.cam_distance not in ("mse", "l1"):
            raise ConfigError("DistillConfig: cam_norm must be 'max' or 'sum', cam_distance 'mse' or 'l1'")
        if self.arch and self.student_arch and self.arch != self.student_arch:
            raise ConfigError(f"DistillConfig: arch={self.arch!r} and student_arch={self.student_arch!r} "
                              "disagree; set student_arch only")


# ------------------------------------------------------------------------------------- losses
def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 4.0, alpha: float = 0.7, ce_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(student_logits, labels)`` (a scalar).

    ``student_logits``, ``teacher_logits``: (B, C); ``labels``: int64 (B,). ``p = softmax(logits / T)``;
    KL is summed over classes and averaged over the batch (``batchmean``). ``ce_weight``: optional class
    weights (C,) for the cross-entropy term only. Computed in float32.
    """
    s = student_logits.float()
    t = teacher_logits.float().detach()
    T = float(temperature)
    kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean", log_target=True)
    loss = alpha * T * T * kl
    if alpha < 1.0:
        w = None if ce_weight is None else ce_weight.to(s.device)
        loss = loss + (1.0 - alpha) * F.cross_entropy(s, labels, weight=w)
    return loss


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention (Zagoruyko & Komodakis 2017): ``features (B, K, h, w)`` -> ``(B, h*w)``.

    The mean over channels of ``A_k^2`` (their ``p = 2``), flattened and L2-normalised per image.
    """
    a = features.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1)


def _as_list(feats) -> list:
    return list(feats.values()) if isinstance(feats, dict) else list(feats)


def attention_transfer_loss(student_feats, teacher_feats) -> torch.Tensor:
    """Mean over layers of ``|| q_s - q_t ||_2`` per image (then mean over images).

    ``student_feats`` / ``teacher_feats``: lists (or dicts, in the same order) of feature maps
    ``(B, K, h, w)``; channel counts may differ. When spatial sizes differ the student's channel-mean
    energy map is resized (bilinear) to the teacher's size before normalisation.
    """
    s_list, t_list = _as_list(student_feats), _as_list(teacher_feats)
    if len(s_list) != len(t_list) or not s_list:
        raise ValueError(f"need the same non-zero number of student and teacher layers; got {len(s_list)} and {len(t_list)}")
    losses = []
    for s, t in zip(s_list, t_list):
        if s.shape[-2:] != t.shape[-2:]:
            energy = s.float().pow(2).mean(dim=1, keepdim=True)
            energy = F.interpolate(energy, size=t.shape[-2:], mode="bilinear", align_corners=False)
            q_s = F.normalize(energy.flatten(1), p=2, dim=1)
        else:
            q_s = attention_map(s)
        q_t = attention_map(t.detach())
        losses.append((q_s - q_t).norm(p=2, dim=1).mean())
    return torch.stack(losses).mean()


def class_activation_maps(feature_map: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          norm: str = "max", eps: float = 1e-8) -> torch.Tensor:
    """CAM of class ``targets``: ``ReLU(sum_k w_k^c A_k)``, normalised per image -> ``(B, h, w)``.

    ``feature_map (B, K, h, w)`` is what the global-average-pool + linear head sees; ``weight (C, K)`` is
    the head's weight. For such heads this equals Grad-CAM up to a positive factor, with no second
    backward pass. ``norm="max"``: each map divided by its maximum (range [0, 1]); ``"sum"``: by its sum.
    An all-zero map stays zero.
    """
    cam = torch.relu(torch.einsum("bkhw,bk->bhw", feature_map.float(), weight[targets].float()))
    denom = cam.amax(dim=(1, 2), keepdim=True) if norm == "max" else cam.sum(dim=(1, 2), keepdim=True)
    return cam / (denom + eps)


def cam_matching_loss(student_feature_map: torch.Tensor, student_weight: torch.Tensor,
                      teacher_feature_map: torch.Tensor, teacher_weight: torch.Tensor, labels: torch.Tensor,
                      norm: str = "max", distance: str = "mse") -> torch.Tensor:
    """Distance between the student's and the teacher's CAMs of the TRUE class (``labels``).

    Maps from :func:`class_activation_maps` (ReLU, per-image ``norm``); the student's is resized
    (bilinear) to the teacher's size when they differ. ``distance``: "mse" (mean squared error over pixels
    and images) or "l1" (mean absolute error). The teacher's map is a constant target.
    """
    cs = class_activation_maps(student_feature_map, student_weight, labels, norm)
    with torch.no_grad():
        ct = class_activation_maps(teacher_feature_map, teacher_weight, labels, norm)
    if cs.shape[-2:] != ct.shape[-2:]:
        cs = F.interpolate(cs[:, None], size=ct.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return F.mse_loss(cs, ct) if distance == "mse" else F.l1_loss(cs, ct)


def _cam_inputs(model: TBClassifier, feats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    fmap = feats[model.gap_layer_name]
    if model.arch.startswith("densenet"):
        fmap = torch.relu(fmap)
    return fmap, model.head.weight


class KDLoss(StepLoss):
    """The per-step distillation loss used by :func:`distill` (see the module docstring).

    ``teacher``: a :class:`TBClassifier` in eval mode, frozen. ``cached_logits``: float32 (N_train, C)
    indexed by dataset index (then the teacher is not run for ``kd="hinton"``).
    """

    def __init__(self, config: DistillConfig, teacher: TBClassifier, student: TBClassifier,
                 cached_logits: torch.Tensor | None = None, ce_weight: torch.Tensor | None = None):
        self.config, self.teacher, self.student = config, teacher, student
        self.cached = cached_logits
        self.ce_weight = ce_weight
        cfg = config
        if cfg.kd == "at":
            self.layers = list(cfg.at_layers)
        elif cfg.kd == "cam":
            self.layers = [student.gap_layer_name]
        else:
            self.layers = []
        self.teacher_layers = ([teacher.gap_layer_name] if cfg.kd == "cam" else self.layers)

    def __call__(self, model, images, labels, indices):
        cfg = self.config
        with capture_features(self.student, self.layers) as s_feats:
            s_logits = model(images)
        if self.cached is not None and not self.layers:
            t_logits = self.cached[indices.cpu()].to(s_logits.device)
            t_feats = {}
        else:
            with torch.no_grad(), capture_features(self.teacher, self.teacher_layers) as t_feats:
                t_logits = self.teacher(images)
        loss = hinton_kd_loss(s_logits, t_logits, labels, cfg.temperature, cfg.alpha, self.ce_weight)
        if cfg.kd == "at":
            loss = loss + cfg.beta * attention_transfer_loss([s_feats[n] for n in self.layers],
                                                             [t_feats[n] for n in self.layers])
        elif cfg.kd == "cam":
            s_map, s_w = _cam_inputs(self.student, s_feats)
            t_map, t_w = _cam_inputs(self.teacher, t_feats)
            loss = loss + cfg.beta * cam_matching_loss(s_map, s_w, t_map, t_w, labels, cfg.cam_norm, cfg.cam_distance)
        return loss


# ------------------------------------------------------------------------------------- caching
def compute_teacher_logits(teacher, dataset, config, device, info=None) -> torch.Tensor:
    """Teacher logits float32 (N, C) on the UN-augmented images of ``dataset`` (row i = item i)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from .train import _collate

    plain = _copy_without_augment(dataset)
    sampler = None
    if info is not None and info.enabled:
        sampler = DistributedSampler(plain, num_replicas=info.world_size, rank=info.rank, shuffle=False)
    loader = DataLoader(plain, batch_size=config.eval_batch_size or 2 * config.batch_size, sampler=sampler,
                        shuffle=False, num_workers=config.num_workers, collate_fn=_collate(),
                        pin_memory=device.type == "cuda")
    indices, logits, _ = predict_logits(teacher, loader, config, info)
    if len(indices) != len(dataset) or not torch.equal(indices, torch.arange(len(dataset))):
        raise RuntimeError("teacher logits do not cover the train split exactly once")
    return logits


def _copy_without_augment(dataset):
    import copy

    plain = copy.copy(dataset)  # shares records, images and cache
    if hasattr(plain, "transform"):  # CXRDataset
        plain.transform = None
    if hasattr(plain, "augment"):
        plain.augment = False
    return plain


# ------------------------------------------------------------------------------------- distill
def _load_teacher(teacher, device) -> tuple[TBClassifier, dict, str]:
    if isinstance(teacher, nn.Module):
        return teacher, {}, "<in-memory model>"
    model, ckpt = load_model(teacher, device="cpu")
    return model, ckpt, str(teacher)


def distill(config: DistillConfig, data, teacher, run_dir, resume: bool = False, *,
            _stop_after_epoch: int | None = None, _on_end=None) -> dict:
    """Train a student from ``teacher`` (a checkpoint path, e.g. ``RUN/teacher/best.pt``, or a model).

    ``data`` and ``run_dir`` as in :func:`tbkd_lib.train.fit`; the teacher is loaded with
    ``load_model``, put in ``eval()`` and frozen (``requires_grad_(False)``), and applied at the
    student's ``image_size``. The student is ``build_model(student_arch or teacher arch, ...)`` with the
    config's ``weights`` / ``input_mode``. Returns ``fit``'s summary plus ``teacher`` (path),
    ``teacher_val`` (the teacher's validation metrics on the same split), ``teacher_cache_seconds``.
    """
    teacher_model, teacher_ckpt, teacher_src = _load_teacher(teacher, "cpu")
    teacher_model.eval().requires_grad_(False)
    spec = teacher_model.spec
    student_arch = config.student_arch or config.arch or spec["arch"]
    config = replace_config(config, arch=student_arch, student_arch=student_arch)
    num_classes = len(class_names(config.scheme))
    if spec["num_classes"] != num_classes:
        raise ConfigError(f"{teacher_src}: the teacher has {spec['num_classes']} logits but scheme "
                          f"{config.scheme!r} has {num_classes} classes")

    def build(c):
        return build_model(student_arch, num_classes=num_classes, weights=c.weights, input_mode=c.input_mode,
                           cam_layer=c.cam_layer)

    def prepare(ctx: RunContext):
        t = teacher_model.to(ctx.device)
        if ctx.config.channels_last:
            t = t.to(memory_format=torch.channels_last)
        t.eval()
        cached = None
        t0 = time.perf_counter()
        if config.kd == "hinton" and config.cache_teacher_logits:
            cached = _cached_logits(ctx, t, teacher_src)
        ctx.extra["teacher_cache_seconds"] = round(time.perf_counter() - t0, 3) if cached is not None else None
        ctx.extra["teacher"] = teacher_src
        ctx.extra["teacher_val"] = _teacher_val(ctx, t)
        return KDLoss(config, t, ctx.model, cached, ctx.class_weights)

    return run_training(config, data, run_dir, resume, kind="student", build=build, prepare=prepare,
                        _stop_after_epoch=_stop_after_epoch, _on_end=_on_end)


def _cached_logits(ctx: RunContext, teacher, teacher_src: str) -> torch.Tensor:
    """Load ``teacher_logits.pt`` when it matches this run, else compute (and, on rank 0, save) it."""
    path = ctx.run_dir / "teacher_logits.pt"
    n = len(ctx.train_dataset)
    key = {"teacher": teacher_src, "image_size": ctx.config.image_size, "n": n}
    if ctx.resume and path.exists():
        saved = load_checkpoint(path)
        if saved.get("key") == key and tuple(saved["logits"].shape) == (n, teacher.num_classes):
            return saved["logits"]
    logits = compute_teacher_logits(teacher, ctx.train_dataset, ctx.config, ctx.device, ctx.info)
    if ctx.info.is_main:
        save_checkpoint(path, {"logits": logits, "key": key})
    return logits


def _teacher_val(ctx: RunContext, teacher) -> dict:
    from torch.utils.data import DataLoader, DistributedSampler

    from .train import _collate, evaluate

    sampler = (DistributedSampler(ctx.val_dataset, num_replicas=ctx.info.world_size, rank=ctx.info.rank,
                                  shuffle=False) if ctx.info.enabled else None)
    loader = DataLoader(ctx.val_dataset, batch_size=ctx.config.eval_batch_size or 2 * ctx.config.batch_size,
                        sampler=sampler, shuffle=False, num_workers=ctx.config.num_workers, collate_fn=_collate())
    val = evaluate(teacher, loader, ctx.config, n_boot=0, info=ctx.info)
    return {k: val.get(k) for k in ("val_loss", "accuracy", "auc_tb", "sensitivity", "specificity",
                                    "precision_macro", "recall_macro")}

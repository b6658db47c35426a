"""Named run budgets: ``smoke`` (tests), ``cpu-quick`` (a 2-core CPU, minutes), ``paper`` (one GPU).

``get_preset(name)`` returns a frozen :class:`Preset` with a teacher :class:`TrainConfig` and a student
:class:`DistillConfig`; override any field with ``replace_config(preset.teacher, epochs=3)``.
``preset.localize`` is the localization scoring config (``tbkd_lib.evaluation.LocalizeConfig``) built
from ``localize_options``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .distill import DistillConfig
from .errors import ConfigError
from .train import TrainConfig

__all__ = ["Preset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A named pair of configs (teacher, student) and what it is for (``description``)."""

    name: str
    teacher: TrainConfig
    student: DistillConfig
    description: str
    localize_options: Mapping = field(default_factory=dict)

    @property
    def localize(self):
        """``LocalizeConfig(**localize_options)`` (imported lazily: it pulls in Captum)."""
        from .evaluation import LocalizeConfig

        return LocalizeConfig(**dict(self.localize_options))


def _pair(name: str, description: str, localize: Mapping | None = None, **common) -> Preset:
    """Teacher and student share the training fields; the student adds the KD defaults."""
    teacher_only = common.pop("teacher", {})
    student_only = common.pop("student", {})
    teacher = TrainConfig(**common, **teacher_only)
    student_common = {k: v for k, v in common.items() if k not in ("arch", "weights")}
    student = DistillConfig(**student_common, **student_only)
    return Preset(name, teacher, student, description, MappingProxyType(dict(localize or {})))


_SMOKE = _pair(
    "smoke",
    "Tiny and fast, for tests and CI: ResNet-18 at 64 px, 1 epoch of at most 2 batches of 8, no bootstrap "
    "to speak of. Proves the plumbing runs; the numbers mean nothing.",
    localize={"methods": ("gradcam",), "max_images": 8, "n_boot": 50, "faithfulness": False},
    arch="resnet18", image_size=64, epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0.0,
    max_train_batches=2, n_boot=50, augment=False, teacher={"snapshot_epochs": (1,)},
)

# cpu-quick: a 2-core CPU, `tbkd run` <= 15 min and `make book` <= 20 min. Three kinds seen, 2026-11/12:
# * Intel Xeon with AMX-BF16: ResNet-18 train step at 224 px, batch 16, 43-49 img/s in bf16 autocast +
#   channels-last vs 16-18 img/s fp32 NCHW (x2.7); fp32 matmul 439 GFLOP/s.
# * AMD EPYC with AVX-512 and AVX512-BF16 (the project's machine): at 160 px, batch 32, 121-127 img/s in
#   bf16 + channels-last vs 44-47 fp32 NCHW (x2.7).
# * AMD EPYC with AVX2 only (no AVX-512, no bf16): fp32 matmul 130 GFLOP/s; 224 px batch 16 7.8 img/s in
#   fp32 and 0.6 img/s in (emulated) bf16 -> amp="auto" is fp32 there (tbkd_lib.hardware). At batch 32:
#   224 px 7.6 img/s, 160 px 19.1, 128 px 25.7 (160 px is 2.5x cheaper than 224, more than its FLOPs).
# Grad-CAM layer (AVX2 machine, teacher 8 epochs at 160 px, val AUC 0.996): layer4 (a 5 x 5 grid) 0.230
# [0.188, 0.276], not above the prior-only floor 0.192 [0.157, 0.230]; layer3 (10 x 10) 0.318 [0.276,
# 0.360] -> layer3.
# Epochs (teacher / student Grad-CAM mIoU on the 60 val TB films; floor 0.192; phantoms seed 0):
#   5 / 4 epochs: bf16 (AVX512-BF16) 0.248 / 0.255 (teacher AUC 0.965); fp32 on the same machine 0.048 /
#   0.188 (AUC 0.916); fp32 on the AVX2 machine 0.273 / 0.252 (AUC 0.992) -- too few epochs: whether the
#   teacher localizes depended on the run.
#   8 / 6 epochs: bf16 seeds 0, 1, 2 -> 0.363 / 0.355, 0.397 / 0.283, 0.298 / 0.299 (teacher AUC
#   0.992-0.993); fp32 0.185 / 0.338.
#   12 / 8 epochs: bf16 0.357 / 0.344; fp32 0.236 / 0.262.
# -> 8 / 6. On the AVX512-BF16 machine the whole run takes ~170 s. The three fp32 runs on that machine
# (one seed each) localized worse than every bf16 run: read one run's teacher-vs-student gap with its
# CI, not as a law. On the AVX2 machine (~33 s per epoch) the run is estimated at ~750 s.
# Localization cost per model on the AVX2 machine (60 scored + 32 calibration films, channels-last fp32):
# Grad-CAM 2.6 s, Guided Grad-CAM 4.7, Saliency 3.2, IG 8 steps 23, SmoothGrad 4 samples 17, occlusion
# with 40-px windows 28 (32-px windows: 45 s); deletion + insertion with 8 steps on 60 films ~13 s per
# method -> 6 steps on 24 films.
# Earlier budget (Xeon, 224 px, 10-12 epochs, layer4): teacher AUC 0.997, Grad-CAM 0.284 vs floor 0.193.
_CPU_QUICK = _pair(
    "cpu-quick",
    "Fits a 2-core CPU in minutes: ResNet-18 from scratch at 160 px, Grad-CAM on layer3 "
    "(a 10 x 10 grid), batch 32, AdamW lr 2e-3 with 1 warm-up epoch and a cosine decay, class-balanced "
    "sampling, channels-last (bf16 autocast only on CPUs with native bf16). Teacher 8 epochs (its "
    "epoch-2 model kept as epoch2.pt: the weakly trained comparison of chapter 4); student: a "
    "born-again ResNet-18, 6 epochs of Hinton KD (T = 4, alpha = 0.7: our defaults) from cached teacher "
    "logits. Localization budget: IG 8 steps, SmoothGrad 4 samples, occlusion 40-px windows without "
    "overlap, 6-step deletion/insertion curves on 24 films, tau tuned on 32 training TB films.",
    localize={"method_kwargs": {"ig": {"n_steps": 8}, "smoothgrad": {"nt_samples": 4},
                                "occlusion": {"window": 40, "stride": 40, "perturbations_per_eval": 16}},
              "faithfulness_steps": 6, "faithfulness_max_images": 24, "amp": "auto"},
    arch="resnet18", image_size=160, cam_layer="backbone.layer3", batch_size=32, lr=2e-3, weight_decay=1e-4,
    warmup_epochs=1.0, balance="sampler", augment=True, n_boot=1000,
    teacher={"epochs": 8, "snapshot_epochs": (2,)}, student={"epochs": 6},
)

_PAPER = _pair(
    "paper",
    "As close to Shawkat, Hasan & Hasan (arXiv 2512.11057) as is public: ResNet-50 teacher and a "
    "born-again ResNet-50 student (the paper: 'a teacher-student framework with ResNet50'), TBX11K "
    "images at 512 px, ImageNet weights IMAGENET1K_V2, one GPU, AMP. OUR GUESSES (not published): "
    "30 epochs, batch 32, AdamW lr 1e-4 with weight decay 1e-4, 1 warm-up epoch then cosine, "
    "class-balanced sampling, the augmentation of tbkd_lib.data, Hinton KD with T = 4 and alpha = 0.7, "
    "the student also starting from ImageNet weights.",
    arch="resnet50", weights="IMAGENET1K_V2", image_size=512, epochs=30, batch_size=32, lr=1e-4,
    weight_decay=1e-4, warmup_epochs=1.0, balance="sampler", augment=True, device="auto", amp="auto",
    num_workers=8, n_boot=1000, teacher={"snapshot_epochs": (2,)}, student={"weights": "IMAGENET1K_V2"},
    localize={"amp": "auto"},
)

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (_SMOKE, _CPU_QUICK, _PAPER)})


def get_preset(name: str) -> Preset:
    """The preset called ``name``; :class:`ConfigError` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None

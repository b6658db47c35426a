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
    max_train_batches=2, n_boot=50, augment=False,
)

# cpu-quick, measured on the 2-core Xeon (AMX bf16) this project runs on, phantoms 600 train / 200 val:
# * speed: ResNet-18 train step at 224 px, batch 16: 43-49 img/s with bf16 autocast + channels-last vs
#   16-18 img/s in fp32 NCHW (x2.7); 192 px is ~1.36x cheaper than 224 px.
# * learning (from scratch, on the phantoms as they were BEFORE FINDING_CONTRAST = 2.5, i.e. harder):
#   224 px / 10 epochs / batch 32 / augment -> val AUC 0.886 (still rising);
#   224 px / 4 epochs without augmentation -> 0.69; 128 px / 12 epochs without augmentation -> 0.82
#   (overfitting: train loss 0.3); batch 16 with augmentation learned far slower (0.60 after 12);
#   192 px / batch 32 / augment reached only 0.63 after 9 of 16 epochs (stopped).
# Verified on the final phantoms (FINDING_CONTRAST 2.5), 2 idle cores: 12 epochs at 224 px take 217 s
# (46.7 img/s; the first epoch ~60 s with cache fill and kernel warm-up, then ~14 s), val AUC 0.997,
# 3-class accuracy 0.915. Its Grad-CAM on val TB films: layer4 mIoU 0.284 [0.245, 0.323], layer3
# 0.268 [0.240, 0.294], prior-only floor 0.193 -> the default layer4 is kept.
# Book budget (make book <= 20 min on 2 cores, measured 2026-11-28): the full `tbkd run` at 12 epochs
# took 657-835 s (the machine is shared: +27 % between two runs), 60 % of it training -> 10 epochs;
# occlusion was 40 % of localization -> 32-px windows (7 x 7 = 49 per 224-px film, one batch each).
_CPU_QUICK = _pair(
    "cpu-quick",
    "Fits a 2-core CPU in minutes: ResNet-18 from scratch at 224 px, 10 epochs, batch 32, AdamW lr 2e-3 "
    "with 1 warm-up epoch and a cosine decay, class-balanced sampling, bf16 autocast + channels-last. "
    "Student: a born-again ResNet-18 distilled with Hinton KD (T = 4, alpha = 0.7: our defaults) from "
    "cached teacher logits. Localization budget: IG 16 steps, occlusion 32-px windows without overlap, "
    "8-step deletion/insertion curves, tau tuned on 32 training TB films, attribution in bf16 autocast.",
    localize={"method_kwargs": {"ig": {"n_steps": 16}, "smoothgrad": {"nt_samples": 8},
                                "occlusion": {"window": 32, "stride": 32, "perturbations_per_eval": 49}},
              "faithfulness_steps": 8, "amp": "auto"},
    arch="resnet18", image_size=224, epochs=10, batch_size=32, lr=2e-3, weight_decay=1e-4,
    warmup_epochs=1.0, balance="sampler", augment=True, n_boot=1000,
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
    num_workers=8, n_boot=1000, student={"weights": "IMAGENET1K_V2"}, localize={"amp": "auto"},
)

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (_SMOKE, _CPU_QUICK, _PAPER)})


def get_preset(name: str) -> Preset:
    """The preset called ``name``; :class:`ConfigError` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None

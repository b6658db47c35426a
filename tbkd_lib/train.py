"""Train the teacher on image labels: ``train_one_epoch``, ``evaluate``, ``fit`` (torchvision references shape).

``fit(config, data, run_dir)`` writes into ``run_dir``:

* ``config.json`` — the :class:`TrainConfig`; ``metrics.jsonl`` — one line per epoch (``epoch`` counts from
  1; ``train_loss``, ``lr``, ``val_loss``, ``accuracy``, ``auc_tb``, ``sensitivity``, ``specificity``,
  ``precision_macro``, ``recall_macro``, ``confusion_matrix``, ``seconds``, ``train_img_per_s``, ``best``);
* ``last.pt`` after every epoch (the full state a resume needs: model, optimizer, scheduler, scaler,
  RNG) and ``best.pt`` when the monitored validation metric improves, both atomic; ``best.pt`` and the
  ``epoch{N}.pt`` snapshots hold the weights and metadata only (:func:`without_resume_state`), a third
  of a full checkpoint, since they are loaded for inference and distillation, never resumed from;
* at the end ``summary.json`` (what ``fit`` returns) and ``val_predictions.json`` (labels and
  probabilities of the best model on the validation split, for ROC plots).

Recipe: AdamW (or SGD) with a per-step cosine schedule after a linear warm-up; class balance by a
weighted sampler (or loss weights); gradient accumulation; early stopping on ``monitor``; mixed precision
(bf16 autocast on a CPU with native bf16, fp32 on other CPUs; on CUDA bf16 where supported, else fp16
with a GradScaler) and channels-last.

Reproducibility: at the start of epoch ``e`` the global RNGs are seeded from ``(seed, e)``, the dataset's
augmentation stream is ``dataset.set_epoch(e)`` and the sampler's generator is seeded from ``(seed, e)``.
So a run interrupted after any epoch and resumed (``resume=True``) ends with the same weights and
metrics as an uninterrupted one (on CPU; GPU kernels may not be bitwise deterministic).

Multi-GPU: launched by ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DDP, the train split is
sharded by a ``DistributedSampler`` (class balance then comes from loss weights), predictions are
gathered for evaluation, and only rank 0 writes files (see ``tbkd_lib.distributed``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .checkpoint import get_rng_state, load_checkpoint, serialize_checkpoint, set_rng_state
from .config import config_to_dict, save_config
from .data.records import class_names
from .distributed import (DistInfo, broadcast_object, cleanup_distributed, gather_predictions,
                          setup_distributed)
from .errors import ConfigError, TbkdError
from .hardware import bf16_is_native
from .io import append_jsonl, atomic_write_bytes, atomic_write_text, read_json, read_jsonl, write_json
from .metrics import classification_metrics

__all__ = ["TrainConfig", "StepLoss", "SupervisedLoss", "train_one_epoch", "evaluate", "fit",
           "build_optimizer", "build_scheduler", "amp_dtype", "epoch_seed", "without_resume_state"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``).

    Model: ``arch``, ``weights`` (None | torchvision weights name | local file), ``input_mode``
    (fold | repeat), ``cam_layer`` (None = family default), ``image_size`` (S), ``scheme`` (3class | binary).
    Optimisation: ``epochs``, ``batch_size``, ``lr`` (peak), ``weight_decay`` (not applied to biases and
    norm weights), ``optimizer`` (adamw | sgd), ``momentum`` (SGD), ``warmup_epochs`` (linear, may be
    fractional), ``min_lr`` (end of the cosine), ``balance`` (sampler | loss | none), ``accum_steps``.
    Data: ``augment`` (train split only), ``num_workers``.
    Selection: ``monitor`` (a key of the validation metrics, e.g. auc_tb, accuracy, val_loss; ``*loss`` is
    minimised, everything else maximised), ``early_stop_patience`` (None/0 = off).
    Speed: ``channels_last``, ``amp`` (auto | bf16 | fp16 | none), ``compile`` (opt-in torch.compile).
    ``device`` (auto | cpu | cuda | cuda:N), ``seed``, ``eval_batch_size`` (None = 2 x batch_size),
    ``n_boot`` (bootstrap resamples for the final CIs; per-epoch evaluation uses none),
    ``max_train_batches`` (None; a smoke-test knob), ``progress`` (None = tqdm's TTY detection).
    ``snapshot_epochs``: epochs whose model is also kept as ``epoch{N}.pt`` (e.g. an early, weakly
    trained model to compare with the final one; weights and metadata, as ``best.pt``).
    """

    arch: str = "resnet18"
    weights: str | None = None
    input_mode: str = "fold"
    cam_layer: str | None = None
    image_size: int = 224
    scheme: str = "3class"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    balance: str = "sampler"
    accum_steps: int = 1
    augment: bool = True
    early_stop_patience: int | None = None
    monitor: str = "auc_tb"
    channels_last: bool = True
    amp: str = "auto"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    eval_batch_size: int | None = None
    n_boot: int = 1000
    max_train_batches: int | None = None
    progress: bool | None = None
    snapshot_epochs: tuple[int, ...] = ()

    def __post_init__(self):
        choices = {"optimizer": ("adamw", "sgd"), "balance": ("sampler", "loss", "none"),
                   "amp": ("auto", "bf16", "fp16", "none"), "input_mode": ("fold", "repeat")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{type(self).__name__}.{name} must be one of {allowed}; got {getattr(self, name)!r}")
        class_names(self.scheme)
        if any(int(e) < 1 for e in self.snapshot_epochs):
            raise ConfigError(f"{type(self).__name__}.snapshot_epochs must hold epochs >= 1; got "
                              f"{self.snapshot_epochs!r}")
        for name in ("epochs", "batch_size", "accum_steps", "image_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{type(self).__name__}.{name} must be >= 1; got {getattr(self, name)!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_epochs < 0:
            raise ConfigError(f"{type(self).__name__}: need lr > 0, min_lr >= 0, warmup_epochs >= 0")


# Fields that may change when resuming: they do not change what is computed.
_OPERATIONAL = {"progress", "num_workers", "device", "eval_batch_size", "n_boot", "compile"}


# ------------------------------------------------------------------------------------- helpers
_RESUME_ONLY = ("optimizer", "lr_scheduler", "scaler", "rng")


def without_resume_state(state: dict) -> dict:
    """``state`` without what only a resume reads (optimizer, scheduler, scaler, RNG): the ``best.pt`` shape.

    ``load_model`` and ``distill`` read ``model``, ``model_spec`` and ``config``; all metadata is kept.
    """
    return {k: v for k, v in state.items() if k not in _RESUME_ONLY}


def epoch_seed(seed: int, epoch: int, stream: str = "train") -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, stream)``."""
    digest = hashlib.blake2b(f"{stream}/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def amp_dtype(config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``config.amp`` on ``device`` (None = full fp32). ``auto``: bf16 on a GPU
    that supports it (else fp16), bf16 on a CPU only where it is native (:mod:`tbkd_lib.hardware`)."""
    if config.amp == "none":
        return None
    if config.amp == "bf16":
        return torch.bfloat16
    if config.amp == "fp16":
        return torch.float16
    if bf16_is_native(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _make_scaler(config, device: torch.device):
    enabled = amp_dtype(config, device) == torch.float16
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # pragma: no cover - old torch


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def build_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and normalisation weights (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    # fused kernels: one call per step instead of a Python loop over tensors (3-5x faster on CPU)
    for fast in ({"fused": True}, {"foreach": True}):
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]  # fresh: optimizers write into them
        try:
            if config.optimizer == "sgd":
                return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                       nesterov=config.momentum > 0, **fast)
            return torch.optim.AdamW(groups, lr=config.lr, **fast)
        except (RuntimeError, TypeError):  # pragma: no cover - fused unsupported (old torch / device)
            continue
    raise AssertionError("unreachable")


def build_scheduler(optimizer, config, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up over ``warmup_epochs`` then cosine from ``lr`` to ``min_lr``."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
    floor = config.min_lr / config.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _tqdm(config, info: DistInfo | None = None, **kw):
    from tqdm.auto import tqdm

    disable = None if config.progress is None else not config.progress
    if info is not None and not info.is_main:
        disable = True
    return tqdm(disable=disable, dynamic_ncols=True, **kw)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)      # DDP


def _dataset_labels(dataset) -> torch.Tensor:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [int(dataset[i]["label"]) for i in range(len(dataset))]
    return torch.as_tensor(labels, dtype=torch.int64)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``N / (C * count_c)`` per class (0 for an absent class): inverse-frequency loss weights."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    w = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


# ------------------------------------------------------------------------------------- losses
class StepLoss:
    """A training loss that sees the model and the batch: ``loss_fn(model, images, labels, indices)``.

    ``train_one_epoch`` also accepts a plain criterion ``loss_fn(logits, labels)`` (e.g.
    ``nn.CrossEntropyLoss()``); subclass this when the loss needs more than the logits (distillation).
    """

    def __call__(self, model, images, labels, indices) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class SupervisedLoss(StepLoss):
    """Cross-entropy on the labels, optionally class-weighted: ``weight (C,)`` or None."""

    def __init__(self, weight: torch.Tensor | None = None):
        self.weight = weight

    def __call__(self, model, images, labels, indices):
        logits = model(images)
        w = None if self.weight is None else self.weight.to(logits.device)
        return nn.functional.cross_entropy(logits.float(), labels, weight=w)


# ------------------------------------------------------------------------------ epoch functions
def train_one_epoch(model, loader, optimizer, scheduler, scaler, config, epoch: int, loss_fn,
                    info: DistInfo | None = None) -> dict:
    """One pass over ``loader`` (at most ``config.max_train_batches`` batches).

    The optimizer and ``scheduler`` step every ``config.accum_steps`` batches (the loss is divided by
    the number of batches in the group). Raises :class:`TbkdError` on a non-finite loss, naming the epoch
    and step. Returns ``{"train_loss", "lr", "train_seconds", "train_img_per_s", "n_images"}`` (loss and
    throughput over all ranks under DDP).
    """
    model.train()
    device = _model_device(model)
    dtype = amp_dtype(config, device)
    n_batches = len(loader) if config.max_train_batches is None else min(len(loader), config.max_train_batches)
    accum = config.accum_steps
    step_loss = isinstance(loss_fn, StepLoss)
    is_ddp = isinstance(_unwrap_compile(model), nn.parallel.DistributedDataParallel)
    bar = _tqdm(config, info, total=n_batches, desc=f"epoch {epoch}/{config.epochs}", leave=False, unit="batch")
    total_loss, n_images = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    try:
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            images = batch["images"].to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = batch["labels"].to(device, non_blocking=True)
            indices = batch.get("indices")
            group_start = (i // accum) * accum
            group_size = min(accum, n_batches - group_start)
            step_now = i - group_start == group_size - 1
            sync = contextlib.nullcontext() if (step_now or not is_ddp) else _unwrap_compile(model).no_sync()
            with sync:
                with _autocast(device, dtype):
                    if step_loss:
                        loss = loss_fn(model, images, labels, indices)
                    else:
                        loss = loss_fn(model(images).float(), labels)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TbkdError(f"non-finite training loss ({value}) at epoch {epoch}, step {i + 1}/{n_batches}; "
                                    f"stopped ({_kept(epoch)}). {_DIVERGED_HINT}")
                scaler.scale(loss / group_size).backward()
            if step_now:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            total_loss += value * len(labels)
            n_images += len(labels)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if info is not None and info.enabled:
        import torch.distributed as dist

        t = torch.tensor([total_loss, float(n_images)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total_loss, n_images = float(t[0]), int(t[1])
    return {"train_loss": total_loss / max(1, n_images), "lr": optimizer.param_groups[0]["lr"],
            "train_seconds": seconds, "train_img_per_s": n_images / max(seconds, 1e-9), "n_images": n_images}


def _unwrap_compile(model):
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def predict_logits(model, loader, config, info: DistInfo | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices (N,), logits float32 (N, C), labels (N,))`` over ``loader``, gathered across ranks."""
    model.eval()
    device = _model_device(model)
    dtype = amp_dtype(config, device)
    idx, out, lab = [], [], []
    offset = 0
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, dtype):
            logits = model(images)
        out.append(logits.float().cpu())
        lab.append(batch["labels"].cpu())
        ind = batch.get("indices")
        idx.append(ind.cpu() if ind is not None else torch.arange(offset, offset + len(images)))
        offset += len(images)
    indices = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    logits = torch.cat(out) if out else torch.zeros(0, 0)
    labels = torch.cat(lab) if lab else torch.zeros(0, dtype=torch.int64)
    info = info or DistInfo()
    indices, both = gather_predictions(info, indices, torch.cat([logits, labels[:, None].float()], 1))
    return indices, both[:, :-1].contiguous(), both[:, -1].long()


_DIVERGED_HINT = "Try a lower lr, amp='none' or a larger warmup_epochs."


def _kept(epoch: int | None) -> str:
    """What is left on disk when ``epoch`` fails."""
    if epoch is None:
        return "nothing was written"
    return f"last.pt still holds epoch {epoch - 1}" if epoch > 1 else "no epoch had finished: there is no last.pt"


def evaluate(model, loader, config, n_boot: int | None = None, info: DistInfo | None = None, *,
             epoch: int | None = None) -> dict:
    """Validation loss and :func:`tbkd_lib.metrics.classification_metrics` of ``model`` on ``loader``.

    ``model.eval()`` is set here. Returns the metrics plus ``val_loss`` (unweighted cross-entropy),
    ``probs`` float32 (N, C), ``labels`` int64 (N,) and ``indices`` (N,) as NumPy arrays (for ROC plots).
    ``n_boot`` defaults to ``config.n_boot``. Non-finite logits (weights that diverged at the last step of
    an epoch, after its loss was checked) raise :class:`TbkdError` naming ``epoch``.
    """
    indices, logits, labels = predict_logits(model, loader, config, info)
    bad = int((~torch.isfinite(logits)).any(dim=1).sum()) if logits.numel() else 0
    if bad:
        when = f" after epoch {epoch}" if epoch is not None else ""
        raise TbkdError(f"non-finite validation logits{when} ({bad} of {len(logits)} images): the weights diverged "
                        f"or the validation images hold NaN; stopped ({_kept(epoch)}). {_DIVERGED_HINT}")
    val_loss = float(nn.functional.cross_entropy(logits, labels)) if len(labels) else None
    probs = torch.softmax(logits, dim=1).numpy()
    metrics = classification_metrics(labels.numpy(), probs, scheme=config.scheme,
                                     n_boot=config.n_boot if n_boot is None else n_boot, seed=config.seed)
    return {"val_loss": val_loss, **metrics, "probs": probs, "labels": labels.numpy(), "indices": indices.numpy()}


# ------------------------------------------------------------------------------------- run dirs
class _RunLock:
    """``run_dir/.lock`` held with a non-blocking ``flock`` for the whole run."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a")
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            self.fh = None
            raise TbkdError(f"{self.path.parent}: another run is writing to this run directory (its lock "
                            f"{self.path} is held); wait for it to finish or use another directory") from None
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # closing releases the flock
        return False


def _check_run_dir(run_dir: Path, resume: bool, config) -> dict | None:
    """Refuse to overwrite another run; on resume return ``last.pt`` (or None to start afresh)."""
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") if run_dir.exists() else []
    last = run_dir / "last.pt"
    if not resume:
        if entries:
            raise TbkdError(f"{run_dir}: already holds a run ({', '.join(entries[:6])}); pass resume=True "
                            "(--resume) to continue it, or choose a new or empty run directory")
        return None
    for torn in run_dir.glob(".*.tmp"):  # atomic writes of a killed run (the lock is ours: no live writer)
        torn.unlink(missing_ok=True)
    if not last.exists():
        return None
    saved = run_dir / "config.json"
    if saved.exists():
        old, new = read_json(saved), config_to_dict(config)
        diff = sorted(k for k in set(old) | set(new) if k not in _OPERATIONAL and old.get(k) != new.get(k))
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ConfigError(f"{saved}: cannot resume with a different configuration ({detail}); "
                              "resume with the saved settings or start a new run directory")
    return load_checkpoint(last)


@dataclass
class RunContext:
    """What a ``prepare`` hook of :func:`run_training` sees (used by ``distill``)."""

    config: Any
    run_dir: Path
    device: torch.device
    info: DistInfo
    train_dataset: Any
    val_dataset: Any
    model: nn.Module
    class_weights: torch.Tensor | None
    resume: bool
    extra: dict = dataclasses.field(default_factory=dict)  # merged into the summary


def _datasets(config, data):
    """``data``: a data-set root (TBX11K/Kaggle/phantom layout) or ``{"train": ds, "val": ds}``."""
    if isinstance(data, Mapping):
        return data["train"], data["val"], None
    from .data import CXRDataset, ImageCache, load_records

    train_records = load_records(data, "train", scheme=config.scheme)
    val_records = load_records(data, "val", scheme=config.scheme)
    cache = ImageCache()
    train = CXRDataset(train_records, image_size=config.image_size, scheme=config.scheme,
                       augment=config.augment, cache=cache, seed=config.seed)
    val = CXRDataset(val_records, image_size=config.image_size, scheme=config.scheme, augment=False,
                     cache=cache, seed=config.seed)
    if config.num_workers > 0:  # workers fork a copy of the cache: fill it first
        cache.warm([r.path for r in train_records] + [r.path for r in val_records], config.image_size)
    return train, val, str(data)


def _collate():
    from .data import collate

    return collate


def _loaders(train_ds, val_ds, config, info: DistInfo, device: torch.device, generator: torch.Generator):
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, WeightedRandomSampler

    labels = _dataset_labels(train_ds)
    num_classes = len(class_names(config.scheme))
    if info.enabled:
        sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=config.seed)
        per_rank = math.ceil(len(train_ds) / info.world_size)
    elif config.balance == "sampler":
        counts = torch.bincount(labels, minlength=num_classes).double()
        weights = (1.0 / counts.clamp(min=1))[labels]
        sampler = WeightedRandomSampler(weights, num_samples=len(train_ds), replacement=True, generator=generator)
        per_rank = len(train_ds)
    else:
        sampler = RandomSampler(train_ds, generator=generator)
        per_rank = len(train_ds)
    common = {"num_workers": config.num_workers, "collate_fn": _collate(), "pin_memory": device.type == "cuda",
              "persistent_workers": False}
    # BatchNorm cannot train on a batch of one: drop a last batch of size 1 only.
    train_loader = DataLoader(train_ds, batch_size=config.batch_size, sampler=sampler,
                              drop_last=per_rank % config.batch_size == 1 and per_rank > 1, **common)
    val_sampler = (DistributedSampler(val_ds, num_replicas=info.world_size, rank=info.rank, shuffle=False)
                   if info.enabled else None)
    val_loader = DataLoader(val_ds, batch_size=config.eval_batch_size or 2 * config.batch_size,
                            sampler=val_sampler, shuffle=False, **common)
    use_loss_weights = config.balance == "loss" or (info.enabled and config.balance == "sampler")
    weights = class_weights(labels, num_classes) if use_loss_weights else None
    return train_loader, val_loader, sampler, weights


def _monitor_value(config, val: dict) -> float | None:
    if config.monitor not in val:
        keys = sorted(k for k, v in val.items() if isinstance(v, (int, float)) or v is None)
        raise ConfigError(f"monitor {config.monitor!r} is not a validation metric; choose one of {keys}")
    v = val[config.monitor]
    return None if v is None or not math.isfinite(v) else float(v)


def _improved(config, value: float | None, best: float | None, have_best: bool) -> bool:
    if not have_best:
        return True  # the first epoch is always the best so far (best.pt always exists)
    if value is None:
        return False
    if best is None:
        return True
    return value < best if config.monitor.endswith("loss") else value > best


_ROW_METRICS = ("val_loss", "accuracy", "auc_tb", "sensitivity", "specificity", "precision_macro",
                "recall_macro", "confusion_matrix")


# ------------------------------------------------------------------------------------- the loop
def run_training(config, data, run_dir, resume: bool = False, *, kind: str = "teacher",
                 build: Callable[[Any], nn.Module] | None = None,
                 prepare: Callable[[RunContext], Any] | None = None,
                 _stop_after_epoch: int | None = None, _on_end: Callable | None = None) -> dict:
    """The loop shared by :func:`fit` and ``distill``.

    ``build(config) -> model`` (default: ``build_model`` from the config); ``prepare(ctx) -> loss_fn``
    (default: :class:`SupervisedLoss` with the class weights). Returns the summary (also written to
    ``run_dir/summary.json``).
    """
    from .models import build_model

    run_dir = Path(run_dir)
    info, device = setup_distributed(config.device)
    lock = _RunLock(run_dir) if info.is_main else contextlib.nullcontext()
    try:
        with lock:
            return _run(config, data, run_dir, resume, kind, build or (lambda c: build_model(
                c.arch, num_classes=len(class_names(c.scheme)), weights=c.weights, input_mode=c.input_mode,
                cam_layer=c.cam_layer)), prepare, info, device, _stop_after_epoch, _on_end)
    except _OOM as exc:
        raise TbkdError(f"out of memory at batch_size={config.batch_size}, image_size={config.image_size} on "
                        f"{device}: try a smaller --batch-size (e.g. {max(1, config.batch_size // 2)}) with "
                        f"accum_steps={config.accum_steps * 2} to keep the effective batch") from exc
    finally:
        cleanup_distributed(info)


def _run(config, data, run_dir, resume, kind, build, prepare, info, device, stop_after, on_end) -> dict:
    error, ckpt = None, None
    if info.is_main:
        try:
            ckpt = _check_run_dir(run_dir, resume, config)
        except TbkdError as exc:
            error = exc
    error = broadcast_object(info, error)
    if error is not None:
        raise error
    has_ckpt = broadcast_object(info, ckpt is not None)
    if has_ckpt and ckpt is None:
        ckpt = load_checkpoint(run_dir / "last.pt")

    train_ds, val_ds, data_root = _datasets(config, data)
    _seed_everything(config.seed)
    raw_model = build(config).to(device)
    if config.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    generator = torch.Generator()
    train_loader, val_loader, sampler, weights = _loaders(train_ds, val_ds, config, info, device, generator)
    n_batches = len(train_loader) if config.max_train_batches is None else min(len(train_loader), config.max_train_batches)
    steps_per_epoch = math.ceil(n_batches / config.accum_steps)
    optimizer = build_optimizer(raw_model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = _make_scaler(config, device)

    start_epoch, best_metric, best_epoch, bad_epochs, stopped = 1, None, None, 0, False
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch = int(ckpt["epoch"]) + 1
        best_metric, best_epoch = ckpt.get("best_metric"), ckpt.get("best_epoch")
        bad_epochs, stopped = int(ckpt.get("bad_epochs", 0)), bool(ckpt.get("stopped", False))

    model = raw_model
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)

    ctx = RunContext(config=config, run_dir=run_dir, device=device, info=info, train_dataset=train_ds,
                     val_dataset=val_ds, model=raw_model, class_weights=weights, resume=ckpt is not None)
    loss_fn = prepare(ctx) if prepare is not None else SupervisedLoss(weights)

    metrics_path = run_dir / "metrics.jsonl"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.json")
        if ckpt is None:
            metrics_path.unlink(missing_ok=True)
        else:  # drop lines of an epoch that finished after the last checkpoint was written
            rows = [r for r in read_jsonl(metrics_path) if r.get("epoch", 0) < start_epoch]
            atomic_write_text(metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    best_state = copy.deepcopy(raw_model.state_dict()) if best_epoch is not None else None
    if ckpt is not None and info.is_main and (run_dir / "best.pt").exists():
        best_state = load_checkpoint(run_dir / "best.pt")["model"]
    del ckpt

    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        _seed_everything(epoch_seed(config.seed, epoch))
        generator.manual_seed(epoch_seed(config.seed, epoch, "sampler"))
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, config, epoch, loss_fn, info)
        if info.enabled:  # BatchNorm running stats drift apart per rank after the last step: use rank 0's
            import torch.distributed as dist

            for buf in raw_model.buffers():
                dist.broadcast(buf, src=0)
        val = evaluate(raw_model, val_loader, config, n_boot=0, info=info, epoch=epoch)
        value = _monitor_value(config, val)
        improved = _improved(config, value, best_metric, best_epoch is not None)
        if improved:
            best_metric, best_epoch, bad_epochs = value, epoch, 0
            best_state = copy.deepcopy(raw_model.state_dict())
        else:
            bad_epochs += 1
        patience = config.early_stop_patience
        stopped = bool(patience) and bad_epochs >= patience
        row = {"epoch": epoch, "train_loss": stats["train_loss"], "lr": stats["lr"],
               **{k: val.get(k) for k in _ROW_METRICS}, "seconds": time.perf_counter() - t0,
               "train_img_per_s": stats["train_img_per_s"], "best": improved}
        if info.is_main:
            append_jsonl(metrics_path, row)
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "config": config_to_dict(config), "model_spec": _unwrap(raw_model).spec,
                     "rng": get_rng_state(), "best_metric": best_metric, "best_epoch": best_epoch,
                     "monitor": config.monitor, "bad_epochs": bad_epochs, "stopped": stopped, "kind": kind,
                     "data": data_root, "val_metrics": {k: val.get(k) for k in _ROW_METRICS}}
            # best.pt (and a snapshot) BEFORE last.pt: a run killed between the two resumes from the previous
            # last.pt and redoes this epoch; the other order would resume with best_epoch = this epoch while
            # best.pt still held an older one
            if improved or epoch in config.snapshot_epochs:
                blob = serialize_checkpoint(without_resume_state(state))  # serialised once, written once or twice
                if improved:
                    atomic_write_bytes(run_dir / "best.pt", blob)
                if epoch in config.snapshot_epochs:
                    atomic_write_bytes(run_dir / f"epoch{epoch}.pt", blob)
            atomic_write_bytes(run_dir / "last.pt", serialize_checkpoint(state))
            _epoch_line(config, info, kind, row, value)
        if stop_after is not None and epoch >= stop_after and epoch < config.epochs:
            return {"interrupted": True, "epochs_run": epoch, "run_dir": str(run_dir)}

    # ---- end: evaluate the best model (with bootstrap CIs), write the summary
    if best_state is not None:
        best_state = broadcast_object(info, best_state) if info.enabled else best_state
        raw_model.load_state_dict(best_state)
    final = evaluate(raw_model, val_loader, config, info=info)
    rows = read_jsonl(metrics_path) if info.is_main else []
    rows = broadcast_object(info, rows)
    train_s = sum(r["seconds"] for r in rows)
    img_s = [r["train_img_per_s"] for r in rows if r.get("train_img_per_s")]
    summary = {
        "kind": kind, "run_dir": str(run_dir), "epochs_run": epoch if rows else 0, "best_epoch": best_epoch,
        "monitor": config.monitor, "best_metric": best_metric, "stopped_early": stopped,
        **{k: final.get(k) for k in ("accuracy", "auc_tb", "sensitivity", "specificity",
                                     "precision_macro", "recall_macro", "val_loss")},
        "seconds": train_s, "img_per_s": float(np.median(img_s)) if img_s else None,
        "best_val": {k: v for k, v in final.items() if k not in ("probs", "labels", "indices")},
        "paths": {name: str(run_dir / name) for name in
                  ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "val_predictions.json")},
        **ctx.extra,
    }
    if rows:
        summary["epochs_run"] = rows[-1]["epoch"]
    if info.is_main:
        images = [r.image for r in getattr(val_ds, "records", [])]
        write_json(run_dir / "val_predictions.json", {
            "class_names": list(class_names(config.scheme)), "labels": final["labels"],
            "probs": np.round(final["probs"], 6), "indices": final["indices"],
            "images": [images[i] for i in final["indices"]] if images else None})
        write_json(run_dir / "summary.json", summary)
    if on_end is not None:
        on_end(raw_model)
    return summary


def _epoch_line(config, info: DistInfo, kind: str, row: dict, value) -> None:
    """One line per epoch, only when progress bars are shown."""
    from tqdm.auto import tqdm

    if config.progress is False or not info.is_main:
        return
    if config.progress is None:
        import sys

        if not sys.stderr.isatty():
            return
    def f(x):
        return f"{x:.4f}" if isinstance(x, float) else "n/a"
    tqdm.write(f"{kind} epoch {row['epoch']}/{config.epochs}: train_loss {f(row['train_loss'])} "
               f"val_loss {f(row['val_loss'])} {config.monitor} {f(value)}{' *' if row['best'] else ''} "
               f"({row['seconds']:.0f} s, {row['train_img_per_s']:.1f} img/s)")


def fit(config: TrainConfig, data, run_dir, resume: bool = False, *, _stop_after_epoch: int | None = None,
        _on_end: Callable | None = None) -> dict:
    """Train a classifier (the teacher) on image labels; see the module docstring for ``run_dir``.

    ``data``: a data-set root read with ``load_records(data, "train")`` / ``"val"`` (TBX11K official or
    Kaggle layout, or phantoms), or a mapping ``{"train": dataset, "val": dataset}`` of datasets whose
    items follow the ``CXRDataset`` contract. ``resume=True`` continues from ``run_dir/last.pt`` (model,
    optimizer, scheduler, scaler, RNG, epoch, best metric, early-stop counter); without ``last.pt`` it
    starts afresh. A finished run resumed returns its summary at once.

    Returns the summary: ``epochs_run``, ``best_epoch``, ``monitor``, ``best_metric``, the best model's
    validation ``accuracy`` / ``auc_tb`` / ``sensitivity`` / ``specificity`` / ..., ``best_val`` (all
    metrics with 95 % CIs), ``seconds`` (sum over epochs, train + validation), ``img_per_s`` (median
    training throughput), ``paths``.
    """
    return run_training(config, data, run_dir, resume, kind="teacher",
                        _stop_after_epoch=_stop_after_epoch, _on_end=_on_end)

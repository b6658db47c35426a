"""``python -m benchmarks.run [--smoke] [--device cpu|cuda] [--out bench]`` — what ``make bench`` runs.

Every row is measured side by side in ONE process: tbkd's code path and its reference alternate
repeat by repeat (so drift on a shared machine hits both), after warm-up, and the figure is the
median of the repeats. Sections:

1. ``train``: one optimisation step (teacher = cross-entropy, KD = born-again student on cached
   teacher logits), tbkd's ``train_one_epoch`` fast path (channels-last, and bf16 autocast where the
   hardware has native bf16: ``amp="auto"``) vs a plain fp32 NCHW loop (the KD reference runs its
   teacher live, as a plain loop would); and vs the machine's limit = model FLOPs per image
   (``FlopCounterMode``, forward + backward) ÷ a measured dense matmul rate in the same precision (the
   faster of ``torch.mm`` and the same GEMM as a 1 × 1 convolution, see :func:`gemm_rates`). On
   a CPU without native bf16 one more row times the same step with bf16 forced, to show why ``auto``
   is fp32 there. When the fast path is below 60 % of the limit, ``torch.profiler``
   splits one step's time by operator family and the row says where the time goes.
2. ``localization``: Grad-CAM maps + IoU scoring of N val TB images, tbkd
   (``evaluate_localization``) vs pytorch-grad-cam's ``GradCAM`` with its own post-processing and a
   NumPy IoU; the two maps compared after the same min–max normalisation; then the cost per image of
   every Captum method in fp32 and on the fast path.
3. ``data``: images/s delivered by tbkd's loader (epoch 1 decodes, later epochs hit the cache)
   vs a loader that PIL-decodes every time; phantom generation images/s.
4. ``end_to_end``: a fresh ``tbkd run --preset smoke`` (wall time, peak resident memory) and the stage
   times of the last full run (``runs/main/report.json``) when there is one.

Results: ``OUT/results.json`` (rows + machine) and ``OUT/results.md`` (the tables).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tbkd_lib.io import write_json, atomic_write_text

TARGETS = {"fast_vs_plain": 2.0, "fraction_of_limit": 0.60, "localization_vs_gradcam": 3.0,
           "loader_vs_train": 5.0}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``train_cases``: ``(arch, image_size, batch)``. ``smoke``: tiny sizes, 1 repeat
    (the test suite runs it so the script cannot rot; its numbers mean nothing)."""

    out: str = "bench"
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1
    compile: bool = False
    train_cases: tuple = (("resnet18", 160, 32), ("resnet18", 224, 16), ("resnet18", 512, 8),
                          ("resnet50", 224, 8), ("resnet50", 512, 4))
    loc_images: int = 32
    loc_size: int = 160
    method_images: int = 8
    data_train: int = 96
    data_val: int = 128
    data_size: int = 160
    checkpoint: str | None = "runs/main/teacher/best.pt"
    main_report: str | None = "runs/main/report.json"
    e2e_smoke: bool = True
    profile: bool = True
    smoke: bool = False

    @classmethod
    def smoke_config(cls, out: str, device: str = "cpu") -> "BenchConfig":
        return cls(out=out, device=device, repeats=1, warmup=1, train_cases=(("resnet18", 64, 4),),
                   loc_images=4, loc_size=64, method_images=2, data_train=8, data_val=16, data_size=64,
                   checkpoint=None, main_report=None, e2e_smoke=True, profile=True, smoke=True)


# ----------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """Seconds per call of each function, the functions alternating repeat by repeat → ``{name: [s…]}``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            _sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def med(xs) -> float:
    return float(statistics.median(xs))


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _row(section: str, what: str, ours: float, unit: str, reference: float | None = None,
         ref_name: str | None = None, higher_is_better: bool = True, target: float | None = None,
         target_name: str | None = None, repeats: int | None = None, note: str = "", **extra) -> dict:
    ratio = None
    if reference:
        ratio = ours / reference if higher_is_better else reference / ours
    met = None if target is None or ratio is None else bool(ratio >= target)
    return {"section": section, "what": what, "ours": ours, "unit": unit, "reference": reference,
            "reference_name": ref_name, "ratio": ratio, "target": target, "target_name": target_name,
            "met": met, "repeats": repeats, "note": note, **extra}


# -------------------------------------------------------------------------------- 1. training step
def gemm_rates(dtype: torch.dtype, device: torch.device, n: int, repeats: int) -> dict[str, float]:
    """Dense GEMM FLOP/s in ``dtype`` on ``device`` (medians of ``repeats``), by the two routes torch
    has on a CPU: ``mm`` — an ``n × n`` ``torch.mm`` (MKL for fp32 on a CPU) — and ``conv1x1`` — the same
    ``n × n × n`` product as a 1 × 1 convolution (oneDNN, the library that runs the models' convolutions).

    Both are dense matmuls (``n`` a multiple of 32); the machine's limit is the faster one. They
    differ: on an AMD EPYC with AVX-512, fp32 ``torch.mm`` gave 215 GFLOP/s and the 1 × 1 convolution
    463 (MKL's fp32 GEMM is half as fast as oneDNN's on this AMD CPU), bf16 951 and 889.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    x = torch.randn(1, n, n // 32, 32, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1, device=device).to(dtype)
    t = paired({"mm": lambda: torch.mm(a, b), "conv1x1": lambda: torch.nn.functional.conv2d(x, w)},
               repeats, 2, device)
    return {"mm": 2 * n ** 3 / med(t["mm"]), "conv1x1": 2 * n ** 3 / med(t["conv1x1"])}


def train_flops_per_image(arch: str, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one training image (convolutions and matmuls, as counted by
    ``torch.utils.flop_counter.FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tbkd_lib.models import build_model

    model = build_model(arch, 3).to(device)
    x = torch.rand(2, 1, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.tensor([0, 2], device=device)).backward()
    return counter.get_total_flops() / 2


def _batch(size: int, batch: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(batch, 1, size, size, generator=g).to(device),
            "labels": torch.randint(0, 3, (batch,), generator=g).to(device),
            "indices": torch.arange(batch)}


def ours_train_step(arch: str, size: int, batch: int, device: torch.device, kd: bool, compile_: bool):
    """tbkd's own step: ``train_one_epoch`` over one batch with the cpu-quick/paper speed settings."""
    from tbkd_lib.distill import DistillConfig, KDLoss
    from tbkd_lib.models import build_model
    from tbkd_lib.train import (SupervisedLoss, TrainConfig, _make_scaler, build_optimizer, build_scheduler,
                                train_one_epoch)

    kw = dict(arch=arch, image_size=size, batch_size=batch, amp="auto", channels_last=True, progress=False,
              warmup_epochs=0.0, device=str(device))
    cfg = DistillConfig(**kw) if kd else TrainConfig(**kw)
    model = build_model(arch, 3).to(device).to(memory_format=torch.channels_last)
    run_model = torch.compile(model) if compile_ else model
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10_000)
    scaler = _make_scaler(cfg, device)
    data = _batch(size, batch, device)
    if kd:
        teacher = build_model(arch, 3).to(device).eval()
        cached = torch.randn(batch, 3)  # teacher logits cached once per run, as distill() does
        loss_fn = KDLoss(cfg, teacher, model, cached_logits=cached)
    else:
        loss_fn = SupervisedLoss()
    return lambda: train_one_epoch(run_model, [data], opt, sched, scaler, cfg, 1, loss_fn)


def plain_train_step(arch: str, size: int, batch: int, device: torch.device, kd: bool):
    """The reference: fp32, NCHW, the textbook loop (KD: the teacher runs live under no_grad)."""
    from tbkd_lib.models import build_model

    model = build_model(arch, 3).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    data = _batch(size, batch, device)
    x, y = data["images"], data["labels"]
    teacher = build_model(arch, 3).to(device).eval() if kd else None
    temperature, alpha = 4.0, 0.7

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        if kd:
            with torch.no_grad():
                t = teacher(x)
            soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(t / temperature, 1),
                            reduction="batchmean") * temperature ** 2
            loss = alpha * soft + (1 - alpha) * F.cross_entropy(logits, y)
        else:
            loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def bench_emulated_bf16(cfg: BenchConfig, device: torch.device, rows: list, log) -> None:
    """Why ``amp="auto"`` is fp32 on a CPU without native bf16: the same tbkd step, bf16 autocast
    forced (``amp="bf16"``) vs auto (fp32 + channels-last), side by side. A small batch: forced bf16
    is an order of magnitude slower there."""
    from tbkd_lib.models import build_model
    from tbkd_lib.train import (SupervisedLoss, TrainConfig, _make_scaler, build_optimizer, build_scheduler,
                                train_one_epoch)

    arch, size, batch = ("resnet18", 64, 2) if cfg.smoke else ("resnet18", 224, 4)
    fns = {}
    for amp in ("auto", "bf16"):
        c = TrainConfig(arch=arch, image_size=size, batch_size=batch, amp=amp, channels_last=True,
                        progress=False, warmup_epochs=0.0, device=str(device))
        model = build_model(arch, 3).to(device).to(memory_format=torch.channels_last)
        opt = build_optimizer(model, c)
        sched = build_scheduler(opt, c, steps_per_epoch=10_000)
        step_data = [_batch(size, batch, device)]
        fns[amp] = (lambda model=model, opt=opt, sched=sched, c=c, d=step_data:
                    train_one_epoch(model, d, opt, sched, _make_scaler(c, device), c, 1, SupervisedLoss()))
    t = paired(fns, cfg.repeats, 1, device)
    auto, forced = batch / med(t["auto"]), batch / med(t["bf16"])
    rows.append(_row("train", f"bf16 forced vs amp auto (fp32): teacher step {arch} {size}px batch {batch}",
                     auto, "img/s", forced, "same step in bf16 autocast", repeats=cfg.repeats,
                     note="this CPU has neither AMX-BF16 nor AVX512-BF16: oneDNN emulates bf16, so "
                          "tbkd_lib.hardware makes amp='auto' choose fp32 here"))
    log(f"bf16 forced on a CPU without native bf16: {forced:.2f} img/s vs auto (fp32) {auto:.2f} img/s")


def profile_step(fn, flops_per_step: float, peak: float) -> str:
    """One profiled step: share of time per operator family, and the convolutions' own FLOP rate."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    families = {"conv+matmul": ("conv", "mm", "addmm", "matmul", "linear"),
                "batch-norm": ("batch_norm",), "optimizer": ("_foreach", "adam", "lerp", "addcdiv", "sqrt"),
                "pool/relu/add": ("pool", "relu", "threshold", "add_", "add")}
    total = 0.0
    share = {k: 0.0 for k in families}
    share["other"] = 0.0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total
        total += t
        name = ev.key.lower()
        for fam, keys in families.items():
            if any(k in name for k in keys):
                share[fam] += t
                break
        else:
            share["other"] += t
    if total <= 0:
        return "profile empty"
    conv_seconds = share["conv+matmul"] / 1e6
    parts = ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in share.items() if v > 0)
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    parts += "; top operators: " + ", ".join(f"`{e.key}` {100 * e.self_cpu_time_total / total:.0f} %" for e in top)
    conv_eff = flops_per_step / conv_seconds / peak if conv_seconds > 0 else float("nan")
    return (f"profile of one step: {parts}; inside conv+matmul kernels the FLOP rate is "
            f"{100 * conv_eff:.0f} % of the matmul peak")


def fast_dtype(device: torch.device) -> torch.dtype:
    """The precision tbkd's ``amp="auto"`` trains in on ``device`` (fp32 on a CPU without native bf16)."""
    from tbkd_lib.train import TrainConfig, amp_dtype

    return amp_dtype(TrainConfig(amp="auto"), device) or torch.float32


def bench_train(cfg: BenchConfig, device: torch.device, rows: list, log) -> dict:
    dtype = fast_dtype(device)
    fast_name = "fp32" if dtype == torch.float32 else str(dtype).removeprefix("torch.")
    n = 512 if cfg.smoke else (4096 if device.type == "cuda" else 2048)
    routes = {fast_name: gemm_rates(dtype, device, n, cfg.repeats)}
    if fast_name != "fp32":
        routes["fp32"] = gemm_rates(torch.float32, device, n, cfg.repeats)
    peak = {"fast": max(routes[fast_name].values()), "fp32": max(routes["fp32"].values())}
    for name, r in routes.items():
        best = max(r, key=r.get)
        log(f"matmul {n}x{n} {name}: torch.mm {r['mm'] / 1e9:.0f} GFLOP/s, 1x1 conv {r['conv1x1'] / 1e9:.0f}")
        rows.append(_row("train", f"dense {n}×{n} matmul peak, {name}", r[best] / 1e9, "GFLOP/s",
                         repeats=cfg.repeats, routes_gflops={k: v / 1e9 for k, v in r.items()},
                         note=f"best of torch.mm {r['mm'] / 1e9:.0f} and the same GEMM as a 1×1 convolution "
                              f"(oneDNN) {r['conv1x1'] / 1e9:.0f} GFLOP/s; the limit below uses the best"))
    if device.type == "cpu" and dtype == torch.float32:
        bench_emulated_bf16(cfg, device, rows, log)
    for arch, size, batch in cfg.train_cases:
        flops = train_flops_per_image(arch, size, device)
        for kd in (False, True):
            kind = "KD student step" if kd else "teacher step"
            torch.manual_seed(0)
            fns = {"ours": ours_train_step(arch, size, batch, device, kd, cfg.compile),
                   "plain": plain_train_step(arch, size, batch, device, kd)}
            t = paired(fns, cfg.repeats, cfg.warmup, device)
            ours, plain = batch / med(t["ours"]), batch / med(t["plain"])
            limit = peak["fast"] / flops
            frac = ours / limit
            note = (f"{flops / 1e9:.1f} GFLOP/img fwd+bwd; limit {limit:.1f} img/s ({fast_name} matmul); "
                    f"ours {100 * frac:.0f} % of it; plain fp32 {100 * plain / (peak['fp32'] / flops):.0f} % of "
                    "the fp32 limit")
            if dtype == torch.float32:
                note += "; no native bf16 on this CPU, so tbkd's fast path is fp32 + channels-last"
            if kd:
                note += "; plain runs the teacher live, ours reads cached logits (as tbkd's distill does)"
            if cfg.profile and frac < TARGETS["fraction_of_limit"]:  # every step that misses
                note += "; " + profile_step(fns["ours"], flops * batch, peak["fast"])
            rows.append(_row("train", f"{kind} {arch} {size}px batch {batch}", ours, "img/s", plain,
                             "plain fp32 NCHW loop", target=TARGETS["fast_vs_plain"], target_name="≥ 2× plain",
                             repeats=cfg.repeats, note=note, fraction_of_limit=frac,
                             fraction_target=TARGETS["fraction_of_limit"],
                             fraction_met=bool(frac >= TARGETS["fraction_of_limit"]), flops_per_image=flops,
                             limit_img_per_s=limit))
            log(f"{kind} {arch} {size}px: ours {ours:.1f} img/s, plain {plain:.1f} img/s (×{ours / plain:.2f}), "
                f"{100 * frac:.0f} % of limit")
            del fns
    return peak


# ---------------------------------------------------------------------------------- 2. localization
def _phantoms(cfg: BenchConfig, out: Path, rows: list, log) -> Path:
    """The benchmark's phantom set (``out/data``, kept between runs) and a phantom-generation row,
    timed on every run: into ``out/data`` when it is new, else into a temporary directory."""
    from tbkd_lib.data import generate_phantoms

    data = out / "data"
    n = cfg.data_train + cfg.data_val
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        target = Path(tmp) / "data" if (data / "truth.json").exists() else data
        t0 = time.perf_counter()
        generate_phantoms(target, n_train=cfg.data_train, n_val=cfg.data_val, seed=0, progress=False)
        seconds = time.perf_counter() - t0
    rows.append(_row("data", "phantom generation, 512 px PNG, one process", n / seconds, "img/s",
                     repeats=1, note=f"{n} images written in {seconds:.1f} s"))
    log(f"phantoms: {n / seconds:.1f} img/s")
    return data


def _model_for_localization(cfg: BenchConfig, device: torch.device):
    from tbkd_lib.checkpoint import load_model
    from tbkd_lib.models import build_model

    if cfg.checkpoint and Path(cfg.checkpoint).exists():
        model, _ = load_model(cfg.checkpoint, device=device)
        return model.eval(), f"checkpoint {cfg.checkpoint}"
    torch.manual_seed(0)
    return build_model("resnet18", 3).to(device).eval(), "randomly initialised ResNet-18 (no checkpoint)"


def reference_gradcam_pipeline(model, images: torch.Tensor, boxes: list, target: int, tau: float,
                               batch_size: int) -> tuple[np.ndarray, float]:
    """pytorch-grad-cam's GradCAM (its own normalise + cv2 resize) and a NumPy IoU → (maps, mIoU)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    maps = []
    with GradCAM(model=model, target_layers=[model.cam_layer]) as cam:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(target)] * len(x)))
    maps = np.concatenate(maps)
    ious = []
    for m, b in zip(maps, boxes):
        gt = np.zeros(m.shape, dtype=bool)
        for x1, y1, x2, y2 in np.asarray(b).reshape(-1, 4):
            gt[int(round(y1)):int(round(y2)), int(round(x1)):int(round(x2))] = True
        mask = m > tau
        union = (mask | gt).sum()
        ious.append((mask & gt).sum() / union if union else 0.0)
    return maps, float(np.mean(ious))


def bench_localization(cfg: BenchConfig, device: torch.device, data: Path, rows: list, log) -> None:
    from tbkd_lib.config import replace_config
    from tbkd_lib.data import ImageCache, load_records
    from tbkd_lib.evaluation import LocalizeConfig, evaluate_localization
    from tbkd_lib.localize import METHODS, amp_dtype_for, attribute, fast_path
    from tbkd_lib.pipeline import localization_inputs
    from tbkd_lib.presets import get_preset
    from tbkd_lib.protocol import normalize_saliency

    model, model_note = _model_for_localization(cfg, device)
    size = cfg.loc_size
    images, boxes, _ = localization_inputs(load_records(data, "val"), size, cfg.loc_images, 0, ImageCache())
    images = images.to(device)
    n = len(images)
    with torch.no_grad():
        target = int(model(images[:1]).shape[1]) - 1
    targets = torch.full((n,), target, dtype=torch.long, device=device)
    tau = 0.5
    base = LocalizeConfig(methods=("gradcam",), tau=tau, n_boot=0, faithfulness=False, batch_size=16)
    fast = replace_config(base, amp="auto")
    ours_fp32 = lambda: evaluate_localization(model, (images, boxes), "gradcam", base)
    ours_fast = lambda: evaluate_localization(model, (images, boxes), "gradcam", fast)
    try:
        import pytorch_grad_cam  # noqa: F401
        have_ref = True
    except ImportError:
        have_ref = False
    def forward_only():  # the floor of any Grad-CAM: one no-grad forward pass in tbkd's precision
        with torch.no_grad(), fast_path(model, "auto"):
            for i in range(0, n, 16):
                model(images[i:i + 16])

    fns = {"ours_fast": ours_fast, "ours_fp32": ours_fp32, "forward": forward_only}
    if have_ref:
        fns["ref"] = lambda: reference_gradcam_pipeline(model, images, boxes, target, tau, 16)
    t = paired(fns, cfg.repeats, cfg.warmup, device)
    rates = {k: n / med(v) for k, v in t.items()}
    # agreement: the same min-max normalisation applied to both final maps
    ours_map = normalize_saliency(attribute(model, images, targets, "gradcam")).cpu().numpy()
    ours_miou = ours_fp32()["miou"]
    if have_ref:
        ref_maps, ref_miou = reference_gradcam_pipeline(model, images, boxes, target, tau, 16)
        ref_norm = normalize_saliency(torch.from_numpy(ref_maps)).numpy()
        diff = float(np.abs(ref_norm - ours_map).max())
        why = ("agree" if diff <= 1e-4 else
               "differ: see the note")
        agree_note = (f"max abs difference of the maps after the same min–max normalisation = {diff:.2e} ({why}); "
                      f"mIoU at tau {tau}: ours {ours_miou:.4f}, reference {ref_miou:.4f}")
        if diff > 1e-4:
            agree_note += ("; pytorch-grad-cam normalises BEFORE its cv2 resize and tbkd after the bilinear "
                           "upsampling, both bilinear with half-pixel centres")
        cost_note = (f"; a no-grad forward pass of the same images alone (fast path) runs at "
                     f"{rates['forward']:.1f} img/s: tbkd's Grad-CAM + scoring costs "
                     f"{rates['forward'] / rates['ours_fast']:.2f} such passes, pytorch-grad-cam's "
                     f"{rates['forward'] / rates['ref']:.2f} (it back-propagates to the input and into every weight)")
        fast_label = ("tbkd, fast path (bf16)" if amp_dtype_for("auto", device) is not None else
                      "tbkd, fast path (no native bf16 here: fp32 + channels-last)")
        for key, label in (("ours_fast", fast_label), ("ours_fp32", "tbkd, fp32")):
            rows.append(_row("localization", f"Grad-CAM maps + IoU scoring, {n} images {size}px, {label}",
                             rates[key], "img/s", rates["ref"], "pytorch-grad-cam 1.5 GradCAM + NumPy IoU",
                             target=TARGETS["localization_vs_gradcam"], target_name="≥ 3× pytorch-grad-cam",
                             repeats=cfg.repeats, max_abs_diff=diff,
                             note=f"{model_note}; {agree_note}" + (cost_note if key == "ours_fast" else "")))
        log(f"localization: ours fast {rates['ours_fast']:.1f}, fp32 {rates['ours_fp32']:.1f}, "
            f"pytorch-grad-cam {rates['ref']:.1f} img/s; max |Δ| {diff:.1e}")
    else:
        rows.append(_row("localization", f"Grad-CAM maps + IoU scoring, {n} images {size}px, tbkd fast path",
                         rates["ours_fast"], "img/s", rates["ours_fp32"], "tbkd fp32", repeats=cfg.repeats,
                         note="pytorch-grad-cam is not installed (make bench installs it): no reference"))
        log("localization: pytorch-grad-cam not installed; tbkd only")
    # cost of each Captum method per image with the cpu-quick budget: fast path vs fp32 where the fast
    # path is bf16; where it is fp32 (no native bf16) the two would be the same code, timed once
    lcfg = get_preset("cpu-quick").localize
    k = min(cfg.method_images, n)
    x, tt = images[:k], targets[:k]
    native = amp_dtype_for("auto", device) is not None
    for method in METHODS:
        kw = lcfg.kwargs_for(method)

        def run_fast(method=method, kw=kw):
            with fast_path(model, "auto"):
                attribute(model, x, tt, method, **kw)

        fns = {"fast": run_fast}
        if native:
            fns["fp32"] = lambda method=method, kw=kw: attribute(model, x, tt, method, **kw)
        t = paired(fns, cfg.repeats, 1, device)
        fast_s = med(t["fast"]) / k
        fp32_s = med(t["fp32"]) / k if native else None
        rows.append(_row("localization", f"Captum {method}, per image ({kw or 'defaults'})", fast_s * 1e3,
                         "ms/img", fp32_s * 1e3 if native else None, "same method in fp32" if native else None,
                         higher_is_better=False, repeats=len(t["fast"]),
                         note=f"{k} images of {size}px, batch {k}"
                              + ("" if native else "; fp32 (no native bf16 on this CPU)")))
        log(f"captum {method}: {fast_s * 1e3:.0f} ms/img" + (f" fast, {fp32_s * 1e3:.0f} ms/img fp32" if native else ""))


# ----------------------------------------------------------------------------------------- 3. data
class NaiveDataset(torch.utils.data.Dataset):
    """Decode with PIL on every access: the loader a first script would write (no augmentation)."""

    def __init__(self, records, size):
        self.records, self.size = records, size

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.records[i].path) as im:
            im = im.convert("L").resize((self.size, self.size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]
        return {"image": x, "label": torch.tensor(0), "boxes": torch.zeros(0, 4), "index": i}


def bench_data(cfg: BenchConfig, data: Path, rows: list, train_rate: float | None, log) -> None:
    from torch.utils.data import DataLoader

    from tbkd_lib.data import CXRDataset, ImageCache, collate, load_records

    records = load_records(data, "train") + load_records(data, "val")
    size = cfg.data_size
    ds = CXRDataset(records, image_size=size, augment=True, cache=ImageCache())
    naive = NaiveDataset(records, size)

    def epoch(dataset, e=0):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(e)
        for _ in DataLoader(dataset, batch_size=32, shuffle=False, num_workers=0, collate_fn=collate):
            pass

    t0 = time.perf_counter()
    epoch(ds, 0)
    first = len(ds) / (time.perf_counter() - t0)
    t = paired({"ours": lambda: epoch(ds, 1), "naive": lambda: epoch(naive)}, cfg.repeats, 1, torch.device("cpu"))
    ours, ref = len(ds) / med(t["ours"]), len(ds) / med(t["naive"])
    rows.append(_row("data", f"loader epoch 1 (decode + resize + cache fill), {size}px, augment on", first,
                     "img/s", ref, "PIL decode every time, no augmentation", repeats=1,
                     note=f"{len(ds)} phantom PNGs at 512 px; tbkd decodes through its general reader "
                          "(8/16-bit, RGB with an equal-channel check, DICOM → float32, float resize) and "
                          "augments; the naive loader takes PIL's 8-bit path and does not augment"))
    rows.append(_row("data", f"loader epoch ≥ 2 (cache), {size}px, augment on", ours, "img/s", ref,
                     "PIL decode every time, no augmentation", repeats=cfg.repeats))
    if train_rate:
        rows.append(_row("data", f"loader epoch ≥ 2 vs the training step it feeds (resnet18, {size}px)", ours,
                         "img/s", train_rate, "tbkd teacher step img/s", target=TARGETS["loader_vs_train"],
                         target_name="≥ 5× the training rate", repeats=cfg.repeats,
                         note=f"epoch 1 (decoding, once per run) is {first / train_rate:.1f}× the training "
                              "rate; later epochs read the uint8 cache"))
    log(f"loader: epoch 1 {first:.0f} img/s, epoch ≥2 {ours:.0f} img/s, naive {ref:.0f} img/s")


# ---------------------------------------------------------------------------------- 4. end to end
def bench_end_to_end(cfg: BenchConfig, out: Path, rows: list, log) -> None:
    if cfg.e2e_smoke:
        run_dir = out / "e2e-smoke"
        if run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        cmd = [sys.executable, "-m", "tbkd_lib", "run", "--preset", "smoke", "--out", str(run_dir),
               "--n-train", "24", "--n-val", "12", "--quiet", "--device", cfg.device]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"tbkd run --preset smoke failed:\n{proc.stderr[-2000:]}")
        report = json.loads((run_dir / "report.json").read_text())
        # measured by the run itself (RUSAGE_SELF): a parent's RUSAGE_CHILDREN can include the
        # parent's own pages at fork time
        peak_mb = report["environment"]["peak_rss_mb"]
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in report["timing"].items() if k != "total")
        rows.append(_row("end_to_end", "tbkd run --preset smoke (24+12 phantoms), fresh process", wall, "s",
                         higher_is_better=False, repeats=1, note=f"peak RSS {peak_mb:.0f} MB; {stages}",
                         peak_rss_mb=peak_mb, timing=report["timing"]))
        log(f"tbkd run smoke: {wall:.1f} s, peak RSS {peak_mb:.0f} MB")
    if cfg.main_report and Path(cfg.main_report).exists():
        report = json.loads(Path(cfg.main_report).read_text())
        timing = report.get("timing", {})
        peak = report.get("environment", {}).get("peak_rss_mb")
        preset = report.get("config", {}).get("run", {}).get("preset")
        for stage, seconds in timing.items():
            rows.append(_row("end_to_end", f"last full run ({cfg.main_report}, preset {preset}): {stage}",
                             seconds, "s", higher_is_better=False, repeats=1,
                             note=(f"peak RSS {peak:.0f} MB" if peak and stage == "total" else ""),
                             peak_rss_mb=peak if stage == "total" else None))


# ------------------------------------------------------------------------------------------ output
def _fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    else:
        s = str(v)
    return f"{s} {unit}".strip()


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# tbkd benchmarks", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
             f"torch {m['torch']}, device `{m['device']}`" + (f" ({m['gpu']})" if m.get("gpu") else "")
             + f", {m['cpu_capability']}. Measured {result['date']} in {result['seconds']:.0f} s"
             + (" — SMOKE run, numbers mean nothing." if result["config"]["smoke"] else "."), "",
             "Each figure is the median of the repeats after warm-up; ours and the reference alternate "
             "repeat by repeat in the same process. `ratio` > 1 means tbkd is faster.", ""]
    titles = {"train": "Training step", "localization": "Localization", "data": "Data",
              "end_to_end": "End to end"}
    for section, title in titles.items():
        rows = [r for r in result["rows"] if r["section"] == section]
        if not rows:
            continue
        lines += [f"## {title}", "", "| what | ours | reference | ratio | target | met | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            ref = "–" if r["reference"] is None else f"{_fmt(r['reference'], r['unit'])} ({r['reference_name']})"
            ratio = "–" if r["ratio"] is None else f"×{r['ratio']:.2f}"
            met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
            target = r["target_name"] or "–"
            if "fraction_of_limit" in r:
                target += f"; ≥ 60 % of limit: {100 * r['fraction_of_limit']:.0f} %"
                met += " / " + ("yes" if r["fraction_met"] else "**no**")
            lines.append(f"| {r['what']} | {_fmt(r['ours'], r['unit'])} | {ref} | {ratio} | {target} | {met} | "
                         f"{r['note']} |")
        lines.append("")
    return "\n".join(lines)


def run(cfg: BenchConfig, log=print) -> dict:
    from tbkd_lib.distributed import resolve_device

    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list = []
    bench_train(cfg, device, rows, log)
    train_rate = next((r["ours"] for r in rows if r["section"] == "train" and r["what"].startswith("teacher step")
                       and f" {cfg.data_size}px" in r["what"] and "resnet18" in r["what"]), None)
    data = _phantoms(cfg, out, rows, log)
    bench_localization(cfg, device, data, rows, log)
    bench_data(cfg, data, rows, train_rate, log)
    bench_end_to_end(cfg, out, rows, log)
    result = {"machine": machine(device), "config": dataclasses.asdict(cfg), "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seconds": time.perf_counter() - t0}
    write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", to_markdown(result))
    log(f"wrote {out / 'results.json'} and {out / 'results.md'} ({result['seconds']:.0f} s)")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench", help="directory for results.json / results.md (default: bench)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat: checks the script runs")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 5)")
    p.add_argument("--compile", action="store_true", help="torch.compile tbkd's training step (opt-in)")
    p.add_argument("--checkpoint", default=None, help="model for the localization section "
                   "(default: runs/main/teacher/best.pt when present, else a random ResNet-18)")
    args = p.parse_args(argv)
    cfg = BenchConfig.smoke_config(args.out, args.device) if args.smoke else BenchConfig(out=args.out,
                                                                                          device=args.device)
    if args.repeats is not None:
        cfg = dataclasses.replace(cfg, repeats=args.repeats)
    if args.compile:
        cfg = dataclasses.replace(cfg, compile=True)
    if args.checkpoint:
        cfg = dataclasses.replace(cfg, checkpoint=args.checkpoint)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

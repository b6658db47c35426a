"""The end-to-end job: data → teacher → student → localization of both → ``report.json``/``report.md``.

``run_pipeline(RunConfig(...), data=None, out="runs/main")`` is what ``tbkd run`` and ``make book`` call.
With ``data=None`` the phantom set is generated first into ``out/data`` (the embedded default).

Stages are resumable: a finished training stage is reused, an interrupted one resumes from its
``last.pt``; a stage directory holding a different configuration is refused. ``report.json`` layout::

    report_version, config, data, timing (seconds per stage), environment (incl. peak_rss_mb),
    teacher|student: {classification: {accuracy, auc_tb, sensitivity, specificity, *_ci95, …},
                      localization: {method: {miou, miou_ci95, hit_rate, energy_pointing, tau, n_images,
                                              per_image_iou, deletion_auc, insertion_auc, …}}},
    comparison: {student_minus_teacher_miou: {method: {diff, ci95, n}}}   (paired over the same images),
    baseline: {prior: {…same keys…}, centre_box: {…}},
    shortcut: {n_val, n_with_cue, n_cue_disagrees, cue_margin, cue_region_area_share,
               teacher: {saliency_share_in_cue, cue_pointing, accuracy_cue_disagrees, accuracy_cue_agrees},
               student: {…}} | null

Scoring protocol (CheXlocalize-style, see ``protocol.py``): the scored split is ``val``; ``tau`` is
tuned on TB images of the TRAIN split (their boxes are never used for training, only here and for the
prior baseline), so tuning never reads the scored split.
"""
from __future__ import annotations

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import replace_config
from .io import atomic_write_text, read_json, to_jsonable, write_json

# Bumped whenever report.json gains or changes keys: a report of another version is produced again
# by the notebooks (tbkd_lib.notebook.ensure_run) instead of being read with missing keys.
REPORT_VERSION = 3

__all__ = ["REPORT_VERSION", "RunConfig", "run_pipeline", "localization_inputs", "classification_on_split",
           "run_localize_config", "score_like_run", "write_report_md"]


@dataclass(frozen=True)
class RunConfig:
    """What ``tbkd run`` does. ``preset`` names teacher/student/localize configs (``presets.py``).

    ``n_train``/``n_val``/``phantom_seed``/``shortcut`` only matter when phantoms are generated.
    ``calibration_images``: at most this many TRAIN TB images tune ``tau`` (all train boxes feed the
    prior). ``n_overlays``: overlay PNGs written next to the report.
    """

    preset: str = "cpu-quick"
    n_train: int = 600
    n_val: int = 200
    phantom_seed: int = 0
    shortcut: float = 0.0
    calibration_images: int = 32
    n_overlays: int = 4
    device: str = "auto"
    progress: bool | None = None


class _Timer:
    def __init__(self):
        self.seconds = {}

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.t0, 2)

        return _Ctx()


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB (None where it cannot be read).

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own memory map.
    ``ru_maxrss`` is only the fallback: it carries over the parent's RSS through fork + exec, so a
    run started from a large process (a notebook kernel, the benchmark) would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024, 1)


def _resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda[:N]``; a GPU that is not there is a TbkdError, not a CUDA traceback."""
    from .distributed import resolve_device

    return resolve_device(name)


def localization_inputs(records, image_size: int, max_images: int | None = None, seed: int = 0, cache=None):
    """TB images with ≥1 box → ``images float32 (N,1,S,S)``, ``boxes`` list of ``(K,4)`` in S-space,
    and the records kept (in order). ``max_images`` takes a seeded random subset. ``cache``: an
    ``ImageCache`` shared with the run's other datasets, so no image is decoded twice."""
    from .data import CXRDataset

    keep = [i for i, r in enumerate(records) if r.label == "tb" and len(r.boxes) > 0]
    if max_images is not None and len(keep) > max_images:
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(keep, size=max_images, replace=False).tolist())
    subset = [records[i] for i in keep]
    ds = CXRDataset(subset, image_size=image_size, augment=False, cache=cache)
    items = [ds[i] for i in range(len(ds))]
    if not items:
        return torch.zeros(0, 1, image_size, image_size), [], []
    images = torch.stack([it["image"] for it in items])
    boxes = [it["boxes"] for it in items]
    return images, boxes, subset


@torch.no_grad()
def classification_on_split(model, records, image_size: int, scheme: str, device, batch_size: int = 64,
                            n_boot: int = 1000, seed: int = 0, cache=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Classification metrics of ``model`` on ``records`` → ``(metrics, labels (N,), probs (N,C))``."""
    from .data import CXRDataset, collate
    from .metrics import classification_metrics

    model.eval()
    ds = CXRDataset(records, image_size=image_size, scheme=scheme, augment=False, cache=cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)
    probs, labels = [], []
    for batch in loader:
        logits = model(batch["images"].to(device))
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(batch["labels"])
    probs = torch.cat(probs).numpy()
    labels = torch.cat(labels).numpy()
    return classification_metrics(labels, probs, scheme=scheme, n_boot=n_boot, seed=seed), labels, probs


def run_pipeline(config: RunConfig = RunConfig(), data=None, out="runs/main", teacher_overrides=None,
                 student_overrides=None, localize_overrides=None, log=print) -> dict:
    """Run every stage (see module doc) and write ``out/report.json``, ``out/report.md``, overlays.

    Returns the report dict. Overrides are dicts of config fields applied on top of the preset.
    """
    from .checkpoint import load_model
    from .data import ImageCache, boxes_to_size, generate_phantoms, load_records
    from .distill import distill
    from .evaluation import evaluate_localization, evaluate_prior_baseline
    from .hardware import cpu_has_native_bf16, cpu_model
    from .locmetrics import centre_box_saliency, paired_difference, prior_map
    from .presets import get_preset
    from .train import amp_dtype, fit

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    t_total = time.perf_counter()
    preset = get_preset(config.preset)
    common = {"device": config.device, "progress": config.progress}
    tcfg = replace_config(preset.teacher, **common, **(teacher_overrides or {}))
    scfg = replace_config(preset.student, **common, **(student_overrides or {}))
    lcfg = replace_config(preset.localize, **(localize_overrides or {}))
    device = _resolve_device(config.device)

    # 1. data ------------------------------------------------------------------------------
    with timer("phantoms"):
        if data is None:
            data = out / "data"
            if (data / "truth.json").exists():
                _check_phantoms(data / "truth.json", config)
            else:
                log(f"phantoms: generating {config.n_train}+{config.n_val} images into {data}")
                generate_phantoms(data, n_train=config.n_train, n_val=config.n_val,
                                  seed=config.phantom_seed, shortcut=config.shortcut,
                                  progress=bool(config.progress))
    data = Path(data)
    train_records = load_records(data, "train")
    val_records = load_records(data, "val")

    # 2. teacher, 3. student ------------------------------------------------------------------
    # resume=True: a finished stage returns its summary at once, an interrupted one continues from
    # last.pt, and a stage run with a different configuration is refused (train.py checks config.json).
    with timer("teacher"):
        t_sum = fit(tcfg, data, out / "teacher", resume=True)
    with timer("student"):
        s_sum = distill(scfg, data, out / "teacher" / "best.pt", out / "student", resume=True)

    # 4. localization ---------------------------------------------------------------------------
    size = tcfg.image_size
    cache = ImageCache()  # one decode per image for every evaluation dataset below
    val_images, val_boxes, val_tb = localization_inputs(val_records, size, lcfg.max_images, lcfg.seed, cache)
    cal_images, cal_boxes, _ = localization_inputs(train_records, size, config.calibration_images, lcfg.seed,
                                                   cache)
    # the prior needs every training TB box, not the pixels: scale the record boxes, decode nothing
    all_train_boxes = [boxes_to_size(r.boxes, (r.height, r.width), (size, size)).clamp(0, size)
                       for r in train_records if r.label == "tb" and r.boxes]
    report = {"report_version": REPORT_VERSION, "config": {"run": config, "teacher": tcfg, "student": scfg, "localize": lcfg},
              "data": {"root": str(data.resolve()), "n_train": len(train_records), "n_val": len(val_records),
                       "n_val_tb_scored": len(val_tb), "n_calibration": len(cal_boxes),
                       "scored_split": "val",
                       "tau_calibration": f"{len(cal_boxes)} TB images of the train split"}}
    maps = {}
    for kind, size_kind in (("teacher", tcfg), ("student", scfg)):
        with timer(f"localize_{kind}"):
            model, _ = load_model(out / kind / "best.pt", device=device)
            model.eval()
            cls, _, probs = classification_on_split(model, val_records, size_kind.image_size, size_kind.scheme,
                                                    device, n_boot=lcfg.n_boot, seed=lcfg.seed, cache=cache)
            loc = {}
            for method in lcfg.methods:
                loc[method] = evaluate_localization(
                    model, (val_images.to(device), val_boxes), method, lcfg,
                    calibration=(cal_images.to(device), cal_boxes))
                log(f"{kind} {method}: mIoU {loc[method]['miou']:.3f} (tau {loc[method]['tau']:.2f})")
            report[kind] = {"classification": cls, "localization": loc,
                            "training": {k: v for k, v in (t_sum if kind == 'teacher' else s_sum).items()
                                         if isinstance(v, (int, float, str))}}
            maps[kind] = model
    # student − teacher per method, paired over the same scored images
    report["comparison"] = {"student_minus_teacher_miou": {
        method: paired_difference(report["teacher"]["localization"][method]["per_image_iou"],
                                  report["student"]["localization"][method]["per_image_iou"],
                                  seed=lcfg.seed, n_boot=lcfg.n_boot)
        for method in lcfg.methods}}
    with timer("baselines"):
        prior = prior_map(all_train_boxes, size, size)
        report["baseline"] = {
            "prior": evaluate_prior_baseline(prior, val_boxes, lcfg, calibration_boxes=cal_boxes),
            # the centre half of the image (a box covering 50 % of each side): the naive floor
            "centre_box": evaluate_prior_baseline(centre_box_saliency(size, size), val_boxes, lcfg,
                                                  calibration_boxes=cal_boxes, name="centre_box"),
        }
    report["shortcut"] = _shortcut_figures(maps, data, val_records, size, lcfg, device, cache)
    with timer("overlays"):
        report["overlays"] = _write_overlays(maps, val_images, val_boxes, val_tb, out, lcfg, report,
                                             config.n_overlays, device)
    timer.seconds["total"] = round(time.perf_counter() - t_total, 2)
    report["timing"] = timer.seconds
    report["environment"] = {"torch": torch.__version__, "device": str(device), "python": platform.python_version(),
                             "cpu": cpu_model(), "cpu_native_bf16": cpu_has_native_bf16(),
                             "train_precision": str(amp_dtype(tcfg, device) or torch.float32).replace("torch.", ""),
                             "threads": torch.get_num_threads(), "peak_rss_mb": _peak_rss_mb()}
    report = to_jsonable(report)  # what the caller gets is exactly what report.json holds
    write_json(out / "report.json", report)
    write_report_md(report, out / "report.md")
    return report


def _check_phantoms(truth_path: Path, config: RunConfig) -> None:
    """Phantoms already in the run directory must be the ones ``config`` asks for: a run must not
    silently score data generated with other sizes, seed or cue."""
    from .errors import ConfigError

    t = read_json(truth_path)
    gen = t.get("generator", {})
    have = {"n_train": gen.get("n_train"), "n_val": gen.get("n_val"), "phantom_seed": t.get("seed"),
            "shortcut": t.get("shortcut")}
    want = {"n_train": config.n_train, "n_val": config.n_val, "phantom_seed": config.phantom_seed,
            "shortcut": config.shortcut}
    diff = {k: (have[k], want[k]) for k in want
            if have[k] is None or (float(have[k]) != float(want[k]))}
    if diff:
        detail = ", ".join(f"{k}: {a} there, {b} asked" for k, (a, b) in diff.items())
        raise ConfigError(f"{truth_path}: the phantoms in this run directory were generated with other "
                          f"settings ({detail}); use another --out, or delete {truth_path.parent} to "
                          f"generate them again")


def _shortcut_truth(data: Path, records, size: int):
    """Per record: (cue present, cue box in S-space or None) from ``truth.json``; None if no cue."""
    path = Path(data) / "truth.json"
    if not path.exists():
        return None
    images = read_json(path).get("images", {})
    present, boxes = [], []
    for r in records:
        cue = (images.get(r.image) or {}).get("shortcut") or {}
        present.append(bool(cue.get("present")))
        box = cue.get("box")
        boxes.append(None if box is None else [v * size / r.width for v in box])
    return (present, boxes) if any(present) else None


@torch.no_grad()
def _predict_tb(model, images, device, batch_size=64):
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model(images[i:i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# The cue's box widened by this share of the image side on each side before saliency is counted in it.
# The phantoms' corner tag is 23 px at 512, i.e. 7 px at 160: smaller than one cell of a layer3 Grad-CAM
# there (16 px), whose hot spot then sits on the tag but mostly outside its box (seen on the cpu-quick
# shortcut run: Grad-CAM on the tag, share inside the bare box 0.003-0.005, the box's area share 0.002).
CUE_MARGIN = 0.05


def cue_region(box, size: int, margin: float = CUE_MARGIN) -> list[float]:
    """The cue box ``[x1, y1, x2, y2]`` (S-space) widened by ``margin · size`` on every side, clipped
    to the ``size × size`` image."""
    m = margin * size
    x1, y1, x2, y2 = box
    return [max(0.0, x1 - m), max(0.0, y1 - m), min(float(size), x2 + m), min(float(size), y2 + m)]


def _shortcut_figures(models: dict, data: Path, records, size: int, lcfg, device, cache=None) -> dict | None:
    """Shortcut reliance on phantoms with a planted cue.

    ``saliency_share_in_cue``: mean share of positive Grad-CAM (target = TB) inside the cue region
    (:func:`cue_region`: the tag's box widened by ``CUE_MARGIN`` of the image side), over val images
    that carry the cue; ``cue_region_area_share`` is that region's mean share of the image area, the
    value a map spread evenly would score. ``cue_pointing``: share of those images whose Grad-CAM
    maximum lies in the cue region (the pointing game, with the cue as the "finding"). ``accuracy_cue_disagrees``: TB-vs-rest accuracy on val images whose
    cue disagrees with the label (cue on a non-TB image, or no cue on a TB image); ``_agrees`` likewise.
    """
    from .data import CXRDataset
    from .evaluation import compute_saliency
    from .locmetrics import energy_pointing, pointing_game
    from .protocol import gt_masks_from_boxes

    truth = _shortcut_truth(data, records, size)
    if truth is None:
        return None
    present, cue_boxes = truth
    ds = CXRDataset(records, image_size=size, augment=False, cache=cache)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    is_tb = torch.tensor([r.label == "tb" for r in records])
    cue = torch.tensor(present)
    disagree = cue != is_tb
    with_cue = [i for i, p in enumerate(present) if p]
    regions = [torch.tensor([cue_region(cue_boxes[i], size)]) for i in with_cue]  # with_cue is never empty
    cue_masks = gt_masks_from_boxes(regions, size, size)
    out = {"n_val": len(records), "n_with_cue": len(with_cue), "n_cue_disagrees": int(disagree.sum()),
           "cue_margin": CUE_MARGIN, "cue_region_area_share": float(cue_masks.float().mean())}
    for kind, model in models.items():
        model.eval()
        tb = model.spec["num_classes"] - 1  # TB is always the last logit
        pred_tb = _predict_tb(model, images, device) == tb
        correct = pred_tb == is_tb
        sub = images[with_cue]
        sal = compute_saliency(model, sub.to(device), torch.full((len(sub),), tb, dtype=torch.long),
                               "gradcam", lcfg).cpu()
        share = energy_pointing(sal, cue_masks)
        pointing = pointing_game(sal, cue_masks)
        out[kind] = {
            "saliency_share_in_cue": float(share.mean()) if len(share) else None,
            "cue_pointing": float(pointing.float().mean()) if len(pointing) else None,
            "accuracy_cue_disagrees": float(correct[disagree].float().mean()) if disagree.any() else None,
            "accuracy_cue_agrees": float(correct[~disagree].float().mean()) if (~disagree).any() else None,
        }
    return out


def _write_overlays(models: dict, images, boxes, records, out: Path, lcfg, report, n: int, device) -> list[str]:
    """Side-by-side PNGs: image with boxes, teacher Grad-CAM, student Grad-CAM (tau in the titles)."""
    # Figures built without pyplot: no backend switch, so a notebook calling this keeps its inline
    # figures (switching to Agg here once silenced every later figure of the calling notebook).
    from matplotlib.figure import Figure

    from .evaluation import compute_saliency
    from .plotting import overlay_saliency, save_figure, set_style, show_image
    from .protocol import boxes_from_masks, normalize_saliency, threshold

    set_style()
    paths = []
    n = min(n, len(images))
    if n == 0:
        return paths
    method = "gradcam" if "gradcam" in lcfg.methods else lcfg.methods[0]
    sub = images[:n]
    maps = {}
    for kind, model in models.items():
        tb = model.spec["num_classes"] - 1
        sal = compute_saliency(model, sub.to(device), torch.full((n,), tb, dtype=torch.long), method, lcfg).cpu()
        maps[kind] = normalize_saliency(sal)
    for i in range(n):
        fig = Figure(figsize=(4 * (1 + len(maps)), 4.2))
        axes = fig.subplots(1, 1 + len(maps))
        show_image(sub[i, 0], boxes[i], title=Path(records[i].image).name, ax=axes[0])
        for ax, (kind, sal) in zip(axes[1:], maps.items()):
            tau = report[kind]["localization"][method]["tau"]
            pred = boxes_from_masks(threshold(sal[i:i + 1], tau))[0]
            overlay_saliency(sub[i, 0], sal[i], boxes[i], pred, tau=tau, title=f"{kind} {method}", ax=ax)
        path = out / "overlays" / f"overlay_{i:02d}.png"
        save_figure(fig, path)
        paths.append(str(path.relative_to(out)))
    return paths


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def _signed(v, digits=3):
    return "–" if v is None else f"{v:+.{digits}f}"


def _ci(pair, digits=3):
    if not pair or pair[0] is None:
        return ""
    return f" [{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def write_report_md(report: dict, path) -> None:
    """``report.md``: classification and localization tables (teacher vs student vs baseline), timing."""
    lines = ["# tbkd run report", ""]
    d = report.get("data", {})
    lines += [f"Data: `{d.get('root')}` — {d.get('n_train')} train / {d.get('n_val')} val images; "
              f"localization scored on {d.get('n_val_tb_scored')} val TB images with boxes; "
              f"tau tuned on {d.get('tau_calibration')}.", ""]
    env = report.get("environment", {})
    if env.get("train_precision"):
        lines += [f"Trained in {env['train_precision']} on {env.get('device')} ({env.get('cpu')}, "
                  f"{env.get('threads')} threads, torch {env.get('torch')}).", ""]
    lines += ["## Classification (val)", "", "| model | accuracy | AUC (TB vs rest) | sensitivity | specificity |",
              "|---|---|---|---|---|"]
    for kind in ("teacher", "student"):
        c = report.get(kind, {}).get("classification", {})
        lines.append(f"| {kind} | " + " | ".join(
            _fmt(c.get(k)) + _ci(c.get(f"{k}_ci95")) for k in ("accuracy", "auc_tb", "sensitivity", "specificity")) + " |")
    lines += ["", "## Localization (val TB images): mIoU = mean over images of IoU(mask at tau, union of boxes)", "",
              "| model | method | mIoU [95 % CI] | hit rate | energy pointing | tau |", "|---|---|---|---|---|---|"]
    for key, label, what in (("prior", "prior-only baseline", "train-box frequency map"),
                             ("centre_box", "centre-box baseline", "centre half of the image")):
        base = report.get("baseline", {}).get(key)
        if base:
            lines.append(f"| {label} | {what} | {_fmt(base.get('miou'))}{_ci(base.get('miou_ci95'))} | "
                         f"{_fmt(base.get('hit_rate'))} | {_fmt(base.get('energy_pointing'))} | "
                         f"{_fmt(base.get('tau'), 2)} |")
    for kind in ("teacher", "student"):
        for method, m in report.get(kind, {}).get("localization", {}).items():
            lines.append(f"| {kind} | {method} | {_fmt(m.get('miou'))}{_ci(m.get('miou_ci95'))} | "
                         f"{_fmt(m.get('hit_rate'))} | {_fmt(m.get('energy_pointing'))} | {_fmt(m.get('tau'), 2)} |")
    diffs = report.get("comparison", {}).get("student_minus_teacher_miou", {})
    if diffs:
        lines += ["", "Student − teacher mIoU, paired over the same images (bootstrap 95 % CI; an interval "
                  "that excludes 0 is a real difference):", "", "| method | student − teacher |", "|---|---|"]
        lines += [f"| {m} | {_signed(d.get('diff'))}{_ci(d.get('ci95'))} |" for m, d in diffs.items()]
    checks = [(kind, m["noise_check"]) for kind in ("teacher", "student")
              for m in report.get(kind, {}).get("localization", {}).values() if m.get("noise_check")]
    if checks:
        lines += ["", "SmoothGrad averages gradients over noisy copies; the model's mean p(TB) on them:", ""]
        lines += [f"- {kind}: {c['p_target_clean']:.3f} on the clean images, {c['p_target_noisy']:.3f} with "
                  f"noise of std {c['stdevs']:g}" for kind, c in checks]
    sc = report.get("shortcut")
    if sc:
        lines += ["", "## Shortcut reliance (planted cue)", "",
                  f"Saliency share: positive Grad-CAM inside the cue's box widened by {sc.get('cue_margin', 0):.0%} of "
                  f"the image side; that region is {_fmt(sc.get('cue_region_area_share'))} of the image area.", "",
                  "| model | saliency share in cue region | Grad-CAM peak in cue region | accuracy, cue disagrees "
                  "| accuracy, cue agrees |", "|---|---|---|---|---|"]
        for kind in ("teacher", "student"):
            s = sc.get(kind, {})
            lines.append(f"| {kind} | {_fmt(s.get('saliency_share_in_cue'))} | {_fmt(s.get('cue_pointing'))} | "
                         f"{_fmt(s.get('accuracy_cue_disagrees'))} | {_fmt(s.get('accuracy_cue_agrees'))} |")
    lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report.get("timing", {}).items()]
    for p in report.get("overlays", []):
        lines.append(f"\n![overlay]({p})")
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_localize_config(report: dict):
    """The :class:`~tbkd_lib.evaluation.LocalizeConfig` a finished run scored with (``report.json``)."""
    from .config import config_from_dict
    from .evaluation import LocalizeConfig

    return config_from_dict(LocalizeConfig, report["config"]["localize"])


def score_like_run(run_dir, checkpoint, methods=("gradcam",), device="auto", data=None,
                   faithfulness: bool = False) -> dict:
    """Score another checkpoint exactly as the finished run in ``run_dir`` scored its own models.

    The same validation TB films (``max_images`` subset and seed of the run's ``LocalizeConfig``), the
    same ``calibration_images`` TRAIN TB films for ``tau``, the same scoring config, so the result sits
    beside the run's rows and its prior-only floor (``report["baseline"]``) on equal terms.
    ``data``: the data root (default: ``report["data"]["root"]``, or the run's own ``run_dir/data``
    phantoms when that root is gone, e.g. after the run directory moved).
    ``faithfulness``: deletion/insertion curves (off by default: they dominate the cost).
    Returns ``{method: evaluate_localization(...) dict}``. A checkpoint trained at another image size
    than the run's teacher is a :class:`ConfigError` (its maps would be scored on other pixels).
    """
    from .checkpoint import load_model
    from .config import config_from_dict
    from .data import ImageCache, load_records
    from .errors import ConfigError
    from .evaluation import evaluate_localization

    report_path = Path(run_dir) / "report.json"
    if not report_path.exists():
        raise ConfigError(f"{report_path}: no report; finish the run first (tbkd run --out {run_dir})")
    report = read_json(report_path)
    run = config_from_dict(RunConfig, report["config"]["run"])
    lcfg = replace_config(run_localize_config(report), methods=tuple(methods), faithfulness=bool(faithfulness))
    size = int(report["config"]["teacher"]["image_size"])
    dev = _resolve_device(device)
    model, ckpt = load_model(checkpoint, device=dev)
    model.eval()
    ckpt_size = int(ckpt.get("config", {}).get("image_size", size))
    if ckpt_size != size:
        raise ConfigError(f"{checkpoint}: trained at {ckpt_size} px, but {report_path} scored {size} px")
    root = Path(data) if data is not None else Path(report["data"]["root"])
    if data is None and not root.exists() and (Path(run_dir) / "data" / "truth.json").exists():
        root = Path(run_dir) / "data"
    cache = ImageCache()
    images, boxes, _ = localization_inputs(load_records(root, "val"), size, lcfg.max_images, lcfg.seed, cache)
    cal_images, cal_boxes, _ = localization_inputs(load_records(root, "train"), size, run.calibration_images,
                                                   lcfg.seed, cache)
    return {m: evaluate_localization(model, (images.to(dev), boxes), m, lcfg,
                                     calibration=(cal_images.to(dev), cal_boxes)) for m in methods}


def localize_split(data, checkpoint, split: str, out, methods=("gradcam",), tau=None, device="auto",
                   max_images=None, on_error="raise", preset: str | None = None,
                   overrides: dict | None = None) -> dict:
    """``tbkd localize``: score one checkpoint on one split → ``out/localization.json`` keyed by method.

    ``tau="auto"`` tunes on TB images of the OTHER split (``train`` when scoring ``val``/``test``,
    else ``val``), never on the scored one. Other ``tau`` specs: ``otsu``, ``pNN``, a float.
    ``preset``: start from that preset's localization budget (method options, ``amp``, faithfulness
    steps; what ``tbkd run --preset`` scores with) instead of :class:`LocalizeConfig`'s defaults;
    ``overrides``: further ``LocalizeConfig`` fields. ``methods``, and ``tau``/``max_images`` when not
    None, win over both (``tau=None``: the preset's or overrides' ``tau``, else ``"auto"``).
    """
    from .checkpoint import load_model
    from .data import load_records
    from .evaluation import LocalizeConfig, evaluate_localization
    from .presets import get_preset

    dev = _resolve_device(device)
    model, ckpt = load_model(checkpoint, device=dev)
    model.eval()
    size = int(ckpt.get("config", {}).get("image_size", 224))
    try:
        tau_spec = float(tau)
    except (TypeError, ValueError):
        tau_spec = tau
    base = get_preset(preset).localize if preset else LocalizeConfig()
    lcfg = replace_config(base, **(overrides or {}))
    lcfg = replace_config(lcfg, methods=tuple(methods), tau=tau_spec, max_images=max_images)
    max_images = lcfg.max_images
    records = load_records(data, split, on_error=on_error)
    images, boxes, kept = localization_inputs(records, size, max_images, lcfg.seed)
    calibration = None
    if lcfg.tau == "auto":
        cal_split = "val" if split.endswith("train") else "train"
        cal_records = load_records(data, split.replace(split.split("_")[-1], cal_split), on_error=on_error)
        cal_images, cal_boxes, _ = localization_inputs(cal_records, size, 64, lcfg.seed)
        calibration = (cal_images.to(dev), cal_boxes)
    result = {}
    for method in methods:
        result[method] = evaluate_localization(model, (images.to(dev), boxes), method, lcfg,
                                               calibration=calibration)
        result[method]["split"] = split
    write_json(Path(out) / "localization.json", result)
    return result

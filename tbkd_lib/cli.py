"""The ``tbkd`` command line. Each sub-command is a thin wrapper over a library function.

Errors raised on purpose (:class:`tbkd_lib.errors.TbkdError`) are printed as one line
``tbkd: error: <file>: <problem>`` with exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, TbkdError

__all__ = ["main", "build_parser"]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: Sequence[str] | None) -> dict:
    """``["epochs=3", "lr=0.001"]`` -> ``{"epochs": 3, "lr": 0.001}`` (values parsed as JSON when possible)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects FIELD=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value)
    return out


def _with_flags(flags: dict, pairs: Sequence[str] | None) -> dict:
    """Dedicated flags (``--epochs 3``) plus ``--set`` pairs; the same field given both ways must agree."""
    sets = _overrides(pairs)
    for key, value in flags.items():
        if value is not None and key in sets and sets[key] != value:
            raise ConfigError(f"{key} given twice with different values ({value!r} and --set {key}={sets[key]!r})")
    return {**flags, **sets}


# --------------------------------------------------------------------------------------- data
def cmd_phantom(args) -> int:
    from .data import generate_phantoms

    summary = generate_phantoms(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed,
                                shortcut=args.shortcut, progress=not args.quiet)
    print(f"phantom: wrote {summary['n_images']} images to {args.out} "
          f"({summary['images_per_s']:.1f} images/s, {summary['seconds']:.1f} s)")
    return 0


def cmd_inspect(args) -> int:
    from .data import load_records, summarize

    records = load_records(args.data, split=args.split, on_error=args.on_error)
    if args.json:
        rows = [json.dumps(r.to_json()) for r in records]
        sys.stdout.write("[\n" + ",\n".join(rows) + "\n]\n")
        return 0
    summary = summarize(records)
    print(f"{args.data}  split={args.split}  images={summary['n_images']}  boxes={summary['n_boxes']}")
    print(f"{'class':<10}{'images':>8}{'boxes':>8}")
    for label, row in summary["per_label"].items():
        print(f"{label:<10}{row['images']:>8}{row['boxes']:>8}")
    skipped = getattr(records, "errors", None)
    if skipped is not None and skipped.skipped:
        print(skipped.summary())
    return 0


# ----------------------------------------------------------------------------------- training
def _teacher_config(args):
    from .presets import get_preset
    from .config import replace_config

    cfg = get_preset(args.preset).teacher
    return replace_config(cfg, **_with_flags(dict(
        arch=args.arch, epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
        device=args.device, lr=args.lr, seed=args.seed, progress=False if args.quiet else None), args.set))


def cmd_train_teacher(args) -> int:
    from .train import fit

    cfg = _teacher_config(args)
    summary = fit(cfg, args.data, Path(args.out) / "teacher", resume=args.resume)
    print(_one_line("teacher", summary))
    return 0


def cmd_distill(args) -> int:
    from .config import replace_config
    from .distill import distill
    from .presets import get_preset

    cfg = get_preset(args.preset).student
    cfg = replace_config(cfg, **_with_flags(dict(
        temperature=args.temperature, alpha=args.alpha, kd=args.kd, student_arch=args.student_arch,
        epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size, device=args.device,
        lr=args.lr, seed=args.seed, progress=False if args.quiet else None), args.set))
    summary = distill(cfg, args.data, args.teacher, Path(args.out) / "student", resume=args.resume)
    print(_one_line("student", summary))
    return 0


def cmd_localize(args) -> int:
    from .pipeline import localize_split

    fields = _with_flags(dict(tau=args.tau, max_images=args.max_images), args.set)  # --tau and --set tau agree
    result = localize_split(args.data, args.checkpoint, args.split, args.out, methods=args.method or ["gradcam"],
                            tau=fields.pop("tau"), device=args.device, max_images=fields.pop("max_images"),
                            on_error=args.on_error, preset=args.preset, overrides=fields)
    for method, m in result.items():
        print(f"localize: {method} mIoU={m['miou']:.4f} [{m['miou_ci95'][0]:.4f}, {m['miou_ci95'][1]:.4f}] "
              f"tau={m['tau']:.3f} n_images={m['n_images']}")
    print(f"localize: wrote {Path(args.out) / 'localization.json'}")
    return 0


def cmd_run(args) -> int:
    from .pipeline import RunConfig, run_pipeline

    cfg = RunConfig(preset=args.preset, n_train=args.n_train, n_val=args.n_val, phantom_seed=args.seed,
                    shortcut=args.shortcut, device=args.device, progress=False if args.quiet else None)
    report = run_pipeline(cfg, data=args.data, out=args.out,
                          teacher_overrides=_overrides(args.set_teacher),
                          student_overrides=_overrides(args.set_student),
                          localize_overrides=_overrides(args.set_localize))
    base = report["baseline"]["prior"]["miou"]
    parts = [f"{k} gradcam mIoU={report[k]['localization'].get('gradcam', {}).get('miou', float('nan')):.3f}"
             for k in ("teacher", "student")]
    print(f"run: {'; '.join(parts)}; prior baseline mIoU={base:.3f}; "
          f"total {report['timing']['total']:.0f} s -> {Path(args.out) / 'report.json'}")
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_images

    result = predict_images(args.checkpoint, args.images, args.out, method=args.method, tau=args.tau,
                            device=args.device)
    for p in result["predictions"]:
        print(f"predict: {p['image']}: {p['predicted']} (p_tb={p['p_tb']:.3f}, {len(p['boxes'])} box(es)) "
              f"-> {p['overlay']}")
    for e in result["errors"]:
        print(f"tbkd: error: {e['error']}", file=sys.stderr)
    return 2 if result["errors"] else 0


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    devices = args.devices.split(",") if args.devices else None
    summary = run_sweep(args.notebook, args.grid, args.out, workers=args.workers, devices=devices)
    print(f"sweep: {len(summary['completed'])} completed, {len(summary['skipped'])} already done, "
          f"{len(summary['failed'])} failed -> {summary['results_md']}")
    for cid, err in summary["failed"].items():
        print(f"sweep: failed {cid}: {err}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def _one_line(kind: str, summary: dict) -> str:
    keys = ("epochs_run", "best_epoch", "best_metric", "auc_tb", "accuracy", "seconds", "img_per_s")
    parts = [f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary[k]}"
             for k in keys if summary.get(k) is not None]
    where = summary.get("run_dir", "")
    return f"{kind}: " + " ".join(parts) + (f"  -> {where}" if where else "")


# ----------------------------------------------------------------------------------- parser
def _add_train_args(p, default_preset="cpu-quick"):
    p.add_argument("--data", required=True, help="data-set root (official TBX11K layout, Kaggle layout or phantoms)")
    p.add_argument("--out", required=True, help="run directory (RUN); this stage writes RUN/<stage>/")
    p.add_argument("--preset", default=default_preset, help="cpu-quick | paper | smoke (default: %(default)s)")
    p.add_argument("--arch")
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue from <stage>/last.pt")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override any config field (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tbkd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="generate the phantom chest X-ray set in the TBX11K layout")
    p.add_argument("out")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortcut", type=float, default=0.0, help="0..1: strength of the planted spurious cue")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("inspect", help="counts per class and boxes, or the records as JSON")
    p.add_argument("data")
    p.add_argument("--split", default="trainval")
    p.add_argument("--json", action="store_true")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train-teacher", help="train the teacher on image labels")
    _add_train_args(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="train the student from a teacher checkpoint")
    _add_train_args(p)
    p.add_argument("--teacher", required=True, help="teacher checkpoint, e.g. RUN/teacher/best.pt")
    p.add_argument("--temperature", type=float)
    p.add_argument("--alpha", type=float)
    p.add_argument("--kd", choices=("hinton", "at", "cam"))
    p.add_argument("--student-arch")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("localize", help="score a checkpoint's attribution maps against the boxes of a split")
    p.add_argument("--data", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--out", required=True)
    p.add_argument("--method", action="append", help="attribution method (repeatable; default gradcam)")
    p.add_argument("--tau", type=_parse_value, help="auto (tuned on the other split) | otsu | pNN | FLOAT; default: the "
                                     "preset's or --set's tau, else auto")
    p.add_argument("--max-images", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    p.add_argument("--preset", help="score with this preset's localization budget (what `tbkd run --preset` "
                                    "uses); default: LocalizeConfig's defaults")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="a LocalizeConfig field (repeatable)")
    p.set_defaults(func=cmd_localize)

    p = sub.add_parser("run", help="the whole job: (phantoms) -> teacher -> student -> localization -> report")
    p.add_argument("--data", help="data-set root; default: generate phantoms into OUT/data")
    p.add_argument("--out", default="runs/main")
    p.add_argument("--preset", default="cpu-quick")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--shortcut", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--set-teacher", action="append", metavar="FIELD=VALUE")
    p.add_argument("--set-student", action="append", metavar="FIELD=VALUE")
    p.add_argument("--set-localize", action="append", metavar="FIELD=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("predict", help="probabilities + saliency overlay + boxes for new images")
    p.add_argument("images", nargs="+", help="PNG / JPEG / DICOM files of any size")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="gradcam")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("sweep", help="run a notebook once per grid combination with papermill")
    p.add_argument("--notebook", required=True)
    p.add_argument("--grid", required=True, help="YAML: {param: [values...], fixed: {...}}")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--devices", help="comma-separated CUDA device ids, one worker process per device")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TbkdError as exc:
        print(f"tbkd: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tbkd inspect … --json | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("tbkd: interrupted", file=sys.stderr)
        return 130

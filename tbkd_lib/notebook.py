"""What every notebook's setup and "reuse or produce" cells call. The environment is read here.

A notebook has the parameters ``smoke``, ``data_dir``, ``run_dir``, ``preset``, ``seed``, ``device``.
``context(...)`` resolves them once: ``smoke=True`` shrinks everything (the ``smoke`` preset, a tiny
phantom set, its own run directory) so that CI and papermill can run every chapter in seconds;
``data_dir=None`` means ``$TBKD_DATA`` if set, else the embedded phantom set inside the run directory;
``data_dir="phantoms"`` forces the phantom set.
``ensure_run(ctx)`` reuses a finished run (``report.json``) or produces the missing stages.
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["in_colab", "NotebookContext", "context", "setup", "ensure_data", "ensure_teacher",
           "ensure_student", "ensure_run", "stage_configs", "SMOKE_SIZES"]

SMOKE_SIZES = {"n_train": 36, "n_val": 24}


def in_colab() -> bool:
    return "google.colab" in sys.modules


@dataclass(frozen=True)
class NotebookContext:
    """Resolved notebook parameters. ``data_dir`` None → phantoms generated in ``run_dir/data``."""

    run_dir: Path
    data_dir: Path | None
    preset: str
    smoke: bool
    seed: int
    device: str
    shortcut: float = 0.0
    overrides: dict = field(default_factory=dict)
    n_train: int | None = None
    n_val: int | None = None

    @property
    def phantom_sizes(self) -> dict:
        """``{"n_train", "n_val"}`` of generated phantoms: tiny under ``smoke``, else the context's
        sizes, else :class:`tbkd_lib.pipeline.RunConfig`'s defaults."""
        from .pipeline import RunConfig

        if self.smoke:
            return dict(SMOKE_SIZES)
        return {"n_train": self.n_train or RunConfig.n_train, "n_val": self.n_val or RunConfig.n_val}

    @property
    def data_root(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.run_dir / "data"


def context(smoke=False, data_dir=None, run_dir=None, preset="cpu-quick", seed=0, device="auto",
            shortcut=0.0, default_run_dir="../runs/main", n_train=None, n_val=None) -> NotebookContext:
    from .config import default_data_dir

    if smoke:
        preset = "smoke"
        default_run_dir = default_run_dir.rstrip("/") + "-smoke"
    if data_dir == "phantoms":  # force the embedded phantom set, whatever $TBKD_DATA says
        data_dir = None
    elif data_dir is None:
        data_dir = default_data_dir()
    return NotebookContext(run_dir=Path(run_dir or default_run_dir).resolve(),
                           data_dir=Path(data_dir).expanduser().resolve() if data_dir else None,
                           preset=preset, smoke=bool(smoke), seed=int(seed), device=device,
                           shortcut=float(shortcut), n_train=n_train, n_val=n_val)


def setup(device="auto", seed=0) -> "object":
    """Figure style, seeds, and one line of versions; returns the ``torch.device`` to use."""
    import numpy as np
    import torch

    from .plotting import set_style

    set_style()
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    gpu = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
    print(f"python {platform.python_version()} | torch {torch.__version__} | device {dev}{gpu} | "
          f"threads {torch.get_num_threads()} | colab {in_colab()}")
    return dev


def ensure_run(ctx: NotebookContext, teacher_overrides=None, student_overrides=None, localize_overrides=None,
               log=print) -> dict:
    """The run's ``report.json``: reused when it was made with the same teacher/student configs,
    else produced (finished training stages are reused, see :func:`tbkd_lib.pipeline.run_pipeline`)."""
    from .io import read_json, to_jsonable
    from .pipeline import REPORT_VERSION, RunConfig, run_pipeline

    from .config import replace_config
    from .presets import get_preset

    report = ctx.run_dir / "report.json"
    if report.exists() and read_json(report).get("report_version") == REPORT_VERSION:
        saved = read_json(report).get("config", {})
        wanted = (*stage_configs(ctx, teacher_overrides, student_overrides),
                  replace_config(get_preset(ctx.preset).localize, **(localize_overrides or {})))
        same = all(_identity(saved.get(kind, {})) == _identity(to_jsonable(cfg))
                   for kind, cfg in zip(("teacher", "student", "localize"), wanted))
        if same:
            log(f"reusing {report}")
            return read_json(report)
    cfg = RunConfig(preset=ctx.preset, phantom_seed=ctx.seed, shortcut=ctx.shortcut, device=ctx.device,
                    progress=False, **ctx.phantom_sizes)
    return run_pipeline(cfg, data=ctx.data_dir, out=ctx.run_dir, teacher_overrides=teacher_overrides,
                        student_overrides=student_overrides, localize_overrides=localize_overrides, log=log)


def _identity(cfg: dict) -> dict:
    """A config without its operational fields (device, progress bars), for "same run?" checks."""
    return {k: v for k, v in cfg.items() if k not in ("device", "progress", "num_workers", "eval_batch_size")}


def ensure_data(ctx: NotebookContext, log=print) -> Path:
    """The data root: ``ctx.data_dir`` if given, else the phantom set in ``run_dir/data`` (generated once)."""
    from .data import generate_phantoms

    root = ctx.data_root
    if ctx.data_dir is None and not (root / "truth.json").exists():
        log(f"generating phantoms into {root}")
        generate_phantoms(root, seed=ctx.seed, shortcut=ctx.shortcut, **ctx.phantom_sizes)
    return root


def stage_configs(ctx: NotebookContext, teacher_overrides=None, student_overrides=None):
    """The teacher and student configs a run of ``ctx`` uses (the same ones ``tbkd run`` builds)."""
    from .config import replace_config
    from .presets import get_preset

    preset = get_preset(ctx.preset)
    common = {"device": ctx.device, "progress": False}
    return (replace_config(preset.teacher, **common, **(teacher_overrides or {})),
            replace_config(preset.student, **common, **(student_overrides or {})))


def ensure_teacher(ctx: NotebookContext, **overrides) -> dict:
    """Train the teacher into ``run_dir/teacher`` unless it is already there; returns its summary."""
    from .train import fit

    tcfg, _ = stage_configs(ctx, overrides)
    return fit(tcfg, ensure_data(ctx), ctx.run_dir / "teacher", resume=True)


def ensure_student(ctx: NotebookContext, **overrides) -> dict:
    """Distil the student into ``run_dir/student`` (teacher first if needed); returns its summary."""
    from .distill import distill

    ensure_teacher(ctx)
    _, scfg = stage_configs(ctx, None, overrides)
    return distill(scfg, ensure_data(ctx), ctx.run_dir / "teacher" / "best.pt", ctx.run_dir / "student",
                   resume=True)

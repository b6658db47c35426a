"""What every notebook's setup and "reuse or produce" cells call. The environment is read here.

A notebook has the parameters ``smoke``, ``data_dir``, ``run_dir``, ``preset``, ``seed``, ``device``.
``context(...)`` resolves them once: ``smoke=True`` shrinks everything (the ``smoke`` preset, a tiny
phantom set, its own run directory) so that CI and papermill can run every chapter in seconds;
``data_dir=None`` means ``$TBKD_DATA`` if set, else the embedded phantom set inside the run directory.
``ensure_run(ctx)`` reuses a finished run (``report.json``) or produces the missing stages.
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["in_colab", "NotebookContext", "context", "setup", "ensure_run", "SMOKE_SIZES"]

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

    @property
    def data_root(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.run_dir / "data"


def context(smoke=False, data_dir=None, run_dir=None, preset="cpu-quick", seed=0, device="auto",
            shortcut=0.0, default_run_dir="../runs/main") -> NotebookContext:
    from .config import default_data_dir

    if smoke:
        preset = "smoke"
        default_run_dir = default_run_dir.rstrip("/") + "-smoke"
    if data_dir is None:
        data_dir = default_data_dir()
    return NotebookContext(run_dir=Path(run_dir or default_run_dir).resolve(),
                           data_dir=Path(data_dir).expanduser().resolve() if data_dir else None,
                           preset=preset, smoke=bool(smoke), seed=int(seed), device=device,
                           shortcut=float(shortcut))


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
    """The run's ``report.json`` (reused when present and complete, else produced stage by stage)."""
    from .io import read_json
    from .pipeline import RunConfig, run_pipeline

    report = ctx.run_dir / "report.json"
    if report.exists() and not (teacher_overrides or student_overrides or localize_overrides):
        log(f"reusing {report}")
        return read_json(report)
    sizes = SMOKE_SIZES if ctx.smoke else {}
    cfg = RunConfig(preset=ctx.preset, phantom_seed=ctx.seed, shortcut=ctx.shortcut, device=ctx.device,
                    progress=False, **sizes)
    return run_pipeline(cfg, data=ctx.data_dir, out=ctx.run_dir, teacher_overrides=teacher_overrides,
                        student_overrides=student_overrides, localize_overrides=localize_overrides, log=log)

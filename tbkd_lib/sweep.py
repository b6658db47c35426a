"""Papermill parameter sweeps: one notebook run per grid combination, resumable, failure-tolerant.

``run_sweep(notebook, grid, out, workers=1, devices=None)``:

* the grid (YAML or dict) maps parameter names to lists of values — every combination is run — and may
  hold a ``fixed:`` mapping passed to every run unchanged;
* each combination gets a stable id and a folder ``out/runs/<id>/`` holding the executed notebook,
  ``params.json``, the notebook's own results (it receives ``run_dir`` = that folder) and
  ``status.json`` (``ok`` | ``failed`` with the error), written atomically when the run ends;
* a combination whose ``status.json`` says ``ok`` is never recomputed; failed ones are retried;
* each worker is one process bound to one device (``CUDA_VISIBLE_DEVICES``) when ``devices`` is given;
* every finished run's ``report.json`` is flattened into ``out/results.csv`` and ``out/results.md``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError, DataError
from .io import atomic_write_text, read_json, write_json

__all__ = ["load_grid", "expand_grid", "combo_id", "run_sweep", "collect_results", "flatten_report"]


def load_grid(grid: str | os.PathLike | Mapping) -> tuple[dict, dict]:
    """Read a grid: ``{name: [values…], …, "fixed": {name: value}}`` → ``(axes, fixed)``."""
    if not isinstance(grid, Mapping):
        import yaml

        path = Path(grid)
        try:
            grid = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(path, "grid file not found") from None
        except yaml.YAMLError as exc:
            raise DataError(path, f"not valid YAML ({exc})") from None
        if not isinstance(grid, Mapping):
            raise DataError(path, "expected a mapping of parameter names to lists of values")
    grid = dict(grid)
    fixed = dict(grid.pop("fixed", None) or {})
    axes = {}
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid parameter {name!r} must be a non-empty list, got {values!r}")
        axes[name] = values
    if not axes:
        raise ConfigError("the grid has no parameter with a list of values")
    return axes, fixed


def expand_grid(axes: Mapping[str, Sequence]) -> list[dict]:
    """Cartesian product in a deterministic order (axes in the given order, values in list order)."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def combo_id(params: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe, stable id: ``alpha=0.5_temperature=4-1a2b3c``."""
    text = json.dumps(params, sort_keys=True)
    digest = hashlib.sha1(text.encode()).hexdigest()[:6]
    readable = "_".join(f"{k}={v}" for k, v in params.items())
    safe = "".join(c if c.isalnum() or c in "=.-_" else "-" for c in readable)[:80]
    return f"{safe}-{digest}"


def _status(run_dir: Path) -> str | None:
    try:
        return read_json(run_dir / "status.json").get("status")
    except DataError:
        return None


# Linux: papermill gets SIGKILL when the sweep dies (PR_SET_PDEATHSIG survives exec), so a killed sweep
# leaves no notebook running on behind it to race the rerun in the same run_dir. A trampoline rather
# than ``preexec_fn``, which is unsafe with the worker threads.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\nexcept Exception:\n    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit('tbkd sweep: the sweep process is gone')\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n")


def _python_cmd(*args: str) -> list[str]:
    if sys.platform.startswith("linux"):
        return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]
    return [sys.executable, *args]


def _run_one(notebook: Path, run_dir: Path, params: dict, device: str | None, timeout: float | None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "params.json", params)
    env = os.environ.copy()
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    params_file = run_dir / "papermill_params.json"
    write_json(params_file, params)
    cmd = _python_cmd("-m", "papermill", str(notebook), str(run_dir / notebook.name),
                      "-f", str(params_file), "--cwd", str(notebook.parent), "--no-progress-bar", "-k", "python3")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    (run_dir / "papermill.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode == 0:
        status = {"status": "ok", "seconds": seconds, "device": device}
    else:
        tail = [line for line in (proc.stderr or "").splitlines() if line.strip()][-3:]
        status = {"status": "failed", "seconds": seconds, "device": device, "returncode": proc.returncode,
                  "error": " | ".join(tail) or "papermill failed (see papermill.log)"}
    write_json(run_dir / "status.json", status)
    return status


def run_sweep(notebook, grid, out, workers: int = 1, devices: Sequence[str] | None = None,
              timeout: float | None = None, log=print) -> dict:
    """Run ``notebook`` once per grid combination (see module doc). Returns a summary dict with
    ``completed``, ``skipped`` (already done), ``failed`` (ids with their errors) and the results paths."""
    notebook = Path(notebook).resolve()
    if not notebook.is_file():
        raise DataError(notebook, "notebook not found")
    out = Path(out).resolve()
    axes, fixed = load_grid(grid)
    combos = expand_grid(axes)
    devices = list(devices) if devices else [None]
    workers = max(1, workers if devices == [None] else len(devices) * max(1, workers // len(devices)))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_json(out / "grid.json", {"notebook": str(notebook), "axes": axes, "fixed": fixed})

    todo, skipped = queue.Queue(), []
    for params in combos:
        cid = combo_id(params)
        if _status(out / "runs" / cid) == "ok":
            skipped.append(cid)
        else:
            todo.put((cid, params))
    failed, completed, lock = {}, [], threading.Lock()

    def worker(slot: int):
        device = devices[slot % len(devices)]
        while True:
            try:
                cid, params = todo.get_nowait()
            except queue.Empty:
                return
            run_dir = out / "runs" / cid
            merged = {**fixed, **params, "run_dir": str(run_dir)}
            try:
                status = _run_one(notebook, run_dir, merged, device, timeout)
            except subprocess.TimeoutExpired:
                status = {"status": "failed", "error": f"timed out after {timeout} s"}
                write_json(run_dir / "status.json", status)
            with lock:
                if status["status"] == "ok":
                    completed.append(cid)
                    log(f"sweep: ok      {cid} ({status.get('seconds', 0):.0f} s)")
                else:
                    failed[cid] = status.get("error", "")
                    log(f"sweep: FAILED  {cid}: {failed[cid]}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = collect_results(out, combos)
    summary = {"n_combinations": len(combos), "completed": completed, "skipped": skipped,
               "failed": failed, **paths}
    write_json(out / "sweep_summary.json", summary)
    return summary


def flatten_report(report: Mapping) -> dict:
    """Scalars of a ``report.json`` as ``model.section.key`` columns (teacher/student/baseline)."""
    row = {}
    for model in ("teacher", "student"):
        block = report.get(model) or {}
        for key in ("accuracy", "auc_tb", "sensitivity", "specificity"):
            value = (block.get("classification") or {}).get(key)
            if value is not None:
                row[f"{model}.{key}"] = value
        for method, loc in (block.get("localization") or {}).items():
            for key in ("miou", "hit_rate", "energy_pointing", "tau"):
                if loc.get(key) is not None:
                    row[f"{model}.{method}.{key}"] = loc[key]
    baseline = (report.get("baseline") or {}).get("prior") or {}
    if baseline.get("miou") is not None:
        row["baseline.prior.miou"] = baseline["miou"]
    return row


def collect_results(out, combos: Sequence[Mapping]) -> dict:
    """Write ``results.csv``/``results.md``: one row per combination (in grid order, no duplicates)."""
    out = Path(out)
    rows = []
    for params in combos:
        cid = combo_id(params)
        run_dir = out / "runs" / cid
        row = {"id": cid, **params, "status": _status(run_dir) or "not run"}
        report = run_dir / "report.json"
        if row["status"] == "ok" and report.exists():
            row.update(flatten_report(read_json(report)))
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    return {"results_csv": str(out / "results.csv"), "results_md": str(out / "results.md")}

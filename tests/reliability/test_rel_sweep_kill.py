"""Case 2 — SIGKILL ``tbkd sweep`` mid-way, rerun: finished combinations are not recomputed, results.csv
has exactly one row per combination, and the killed sweep leaves no notebook running behind it."""
from __future__ import annotations

import csv
import json

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from tbkd_lib.sweep import combo_id, expand_grid

pytest.importorskip("papermill")

GRID = {"x": [1, 2, 3, 4]}


def _notebook(path):
    """Counts its executions in run_dir/count.txt FIRST, then sleeps ~1 s and writes report.json."""
    params = new_code_cell("x = 0\nrun_dir = None")
    params.metadata["tags"] = ["parameters"]
    body = new_code_cell(
        "import json, pathlib, time\n"
        "count = pathlib.Path(run_dir, 'count.txt')\n"
        "count.write_text(str(int(count.read_text()) + 1 if count.exists() else 1))\n"
        "time.sleep(1.0)\n"
        "report = {'teacher': {'classification': {'auc_tb': 0.5 + x / 10}}, 'baseline': {'prior': {'miou': x / 10}}}\n"
        "pathlib.Path(run_dir, 'report.json').write_text(json.dumps(report))\n")
    nb = new_notebook(cells=[params, body], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                     "language": "python"}})
    nbformat.write(nb, path)
    return path


def _statuses(out, ids):
    found = {}
    for cid in ids:
        path = out / "runs" / cid / "status.json"
        if path.exists():
            found[cid] = json.loads(path.read_text())["status"]
    return found


def _count(out, cid) -> int:
    path = out / "runs" / cid / "count.txt"
    return int(path.read_text()) if path.exists() else 0


@pytest.mark.slow
def test_sigkill_sweep_then_rerun(rel, tmp_path):
    nb = _notebook(tmp_path / "job.ipynb")
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"x: {GRID['x']}\n")
    out = tmp_path / "sweep"
    ids = [combo_id(p) for p in expand_grid(GRID)]
    args = ["sweep", "--notebook", nb, "--grid", grid, "--out", out]

    proc = rel.start_tbkd(*args)
    assert rel.wait_for(lambda: "ok" in _statuses(out, ids).values(), 120, proc), rel.finish(proc)[2]
    delay = rel.rng("sweep").uniform(0.0, 1.5)
    rel.wait_for(lambda: False, delay, proc)
    children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    assert rel.sigkill(proc), f"the sweep finished before the kill (seed {rel.SEED})"
    done = {cid for cid, s in _statuses(out, ids).items() if s == "ok"}
    note = f"(seed {rel.SEED}, killed {delay:.2f} s after the first ok; done then: {len(done)}/{len(ids)})"
    assert 1 <= len(done) < len(ids), note
    print("sweep", note)
    reports_at_kill = {cid for cid in ids if (out / "runs" / cid / "report.json").exists()}
    counts_at_kill = {cid: _count(out, cid) for cid in ids}
    # no papermill / kernel of the killed sweep runs on: an orphan would finish its notebook (writing
    # report.json) and race the rerun in the same run_dir
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans of the killed sweep still running: {[p.cmdline()[:4] for p in alive]} {note}"
    late = {cid for cid in ids if (out / "runs" / cid / "report.json").exists()} - reports_at_kill
    assert not late, f"notebooks of the killed sweep kept running and wrote {sorted(late)} {note}"
    assert {cid: _count(out, cid) for cid in ids} == counts_at_kill, note

    rerun = rel.run_tbkd(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(ids) - len(done)} completed, {len(done)} already done, 0 failed" in rerun.stdout, rerun.stdout
    for cid in ids:
        if cid in done:  # finished before the kill: never executed again
            assert _count(out, cid) == 1, f"{cid} recomputed {note}"
        else:  # interrupted or never started: executed exactly once more
            assert _count(out, cid) == counts_at_kill[cid] + 1, f"{cid} {note}"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["id"] for r in rows] == ids, note  # one row per combination, grid order, no duplicates
    assert all(r["status"] == "ok" for r in rows), rows
    assert [float(r["teacher.auc_tb"]) for r in rows] == [0.5 + x / 10 for x in GRID["x"]]

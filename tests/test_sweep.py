"""tbkd sweep: a 2×1 grid with one forced failure; resumability; results without duplicates."""
import json
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from tbkd_lib.sweep import collect_results, combo_id, expand_grid, flatten_report, load_grid, run_sweep

pytest.importorskip("papermill")


def _notebook(path):
    params = new_code_cell("x = 0\nmode = 'ok'\nrun_dir = None")
    params.metadata["tags"] = ["parameters"]
    body = new_code_cell(
        "import json, pathlib\n"
        "if mode == 'fail':\n"
        "    raise RuntimeError('forced failure for x=%s' % x)\n"
        "report = {'teacher': {'classification': {'auc_tb': 0.5 + x / 10},\n"
        "                      'localization': {'gradcam': {'miou': x / 10, 'tau': 0.5}}},\n"
        "          'baseline': {'prior': {'miou': 0.1}}}\n"
        "pathlib.Path(run_dir, 'report.json').write_text(json.dumps(report))\n"
        "count = pathlib.Path(run_dir, 'count.txt')\n"
        "count.write_text(str(int(count.read_text()) + 1 if count.exists() else 1))")
    nb = new_notebook(cells=[params, body], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                     "language": "python"}})
    nbformat.write(nb, path)
    return path


def test_grid_expansion_and_ids(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("alpha: [0.3, 0.7]\ntemperature: [4]\nfixed: {smoke: true}\n")
    axes, fixed = load_grid(grid)
    assert fixed == {"smoke": True}
    combos = expand_grid(axes)
    assert combos == [{"alpha": 0.3, "temperature": 4}, {"alpha": 0.7, "temperature": 4}]
    ids = [combo_id(c) for c in combos]
    assert len(set(ids)) == 2 and ids[0].startswith("alpha=0.3_temperature=4-")
    assert combo_id(combos[0]) == ids[0]  # stable


def test_bad_grid_is_named(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("alpha: 0.3\n")
    with pytest.raises(Exception, match="alpha"):
        load_grid(grid)
    with pytest.raises(Exception, match="grid.yaml"):
        load_grid(tmp_path / "missing" / "grid.yaml")


def test_flatten_report():
    row = flatten_report({"student": {"classification": {"auc_tb": 0.9},
                                      "localization": {"ig": {"miou": 0.2, "hit_rate": 0.5}}},
                          "baseline": {"prior": {"miou": 0.14}}})
    assert row == {"student.auc_tb": 0.9, "student.ig.miou": 0.2, "student.ig.hit_rate": 0.5,
                   "baseline.prior.miou": 0.14}


@pytest.mark.slow
def test_sweep_with_one_failure_is_resumable(tmp_path):
    nb = _notebook(tmp_path / "job.ipynb")
    out2 = tmp_path / "sweep"
    # a 1×2 grid whose second combination is forced to fail
    s1 = run_sweep(nb, {"x": [1], "mode": ["ok", "fail"]}, out2, log=lambda *_: None)
    ok_id, fail_id = combo_id({"x": 1, "mode": "ok"}), combo_id({"x": 1, "mode": "fail"})
    assert s1["completed"] == [ok_id]
    assert list(s1["failed"]) == [fail_id] and "forced failure" in s1["failed"][fail_id]
    status = json.loads((out2 / "runs" / fail_id / "status.json").read_text())
    assert status["status"] == "failed"
    # rerun: the completed one is not recomputed, the failed one is retried (and fails again)
    s2 = run_sweep(nb, {"x": [1], "mode": ["ok", "fail"]}, out2, log=lambda *_: None)
    assert s2["skipped"] == [ok_id] and list(s2["failed"]) == [fail_id]
    assert (out2 / "runs" / ok_id / "count.txt").read_text() == "1"
    lines = (out2 / "results.csv").read_text().splitlines()
    assert len(lines) == 3  # header + one row per combination, no duplicates
    assert "teacher.gradcam.miou" in lines[0]
    assert lines[1].startswith(ok_id) and ",ok," in lines[1] + ","
    assert fail_id in lines[2] and "failed" in lines[2]
    md = (out2 / "results.md").read_text()
    assert ok_id in md and fail_id in md

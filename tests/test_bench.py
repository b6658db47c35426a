"""benchmarks/run.py --smoke: the benchmark script runs end to end and writes its table (numbers unchecked)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_writes_results(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    sections = {r["section"] for r in result["rows"]}
    assert sections == {"train", "localization", "data", "end_to_end"}
    for row in result["rows"]:
        assert row["ours"] > 0 and row["unit"]
        if row["reference"] is not None:
            assert row["ratio"] > 0
    steps = [r for r in result["rows"] if r["what"].startswith(("teacher step", "KD student step"))]
    assert len(steps) == 2 and all(0 < r["fraction_of_limit"] and r["flops_per_image"] > 0 for r in steps)
    from tbkd_lib.hardware import cpu_has_native_bf16

    forced = [r for r in result["rows"] if r["what"].startswith("bf16 forced")]
    assert len(forced) == (0 if cpu_has_native_bf16() else 1)  # why amp="auto" is fp32 on such a CPU
    captum = [r for r in result["rows"] if r["what"].startswith("Captum ")]
    assert len(captum) == 6
    assert {"cpu", "cores", "torch", "device"} <= set(result["machine"])
    md = (out / "results.md").read_text()
    assert md.startswith("# tbkd benchmarks") and "SMOKE" in md and "| what | ours |" in md


def test_markdown_marks_missed_targets():
    from benchmarks.run import _row, to_markdown

    rows = [_row("train", "teacher step", 10.0, "img/s", 8.0, "plain", target=2.0, target_name="≥ 2× plain",
                 fraction_of_limit=0.3, fraction_met=False),
            _row("data", "loader", 500.0, "img/s", 50.0, "naive")]
    md = to_markdown({"machine": {"cpu": "X", "cores": 2, "torch_threads": 2, "torch": "t", "device": "cpu",
                                  "cpu_capability": "AVX512"},
                      "config": {"smoke": False}, "rows": rows, "date": "d", "seconds": 1.0})
    assert "| teacher step | 10 img/s | 8 img/s (plain) | ×1.25 | ≥ 2× plain; ≥ 60 % of limit: 30 % | **no** / **no** |" in md
    assert "×10.00" in md

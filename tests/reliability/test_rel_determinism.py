"""Case 8 — the whole job twice, same seed, CPU, different directories: identical report.json (all but
timing, environment, paths and seconds)."""
from __future__ import annotations

import json

import pytest

VOLATILE = ("timing", "environment")


def _comparable(obj, out: str):
    """``obj`` without volatile keys (timing, environment, ``*seconds*``, throughput) and with the run
    directory replaced by ``<OUT>`` in every string."""
    if isinstance(obj, dict):
        return {k: _comparable(v, out) for k, v in obj.items()
                if k not in VOLATILE and "seconds" not in k and not k.endswith("per_s")}
    if isinstance(obj, list):
        return [_comparable(v, out) for v in obj]
    if isinstance(obj, str):
        return obj.replace(out, "<OUT>")
    return obj


@pytest.mark.slow
def test_two_runs_same_seed_same_report(rel, tmp_path):
    outs = [tmp_path / "A", tmp_path / "B"]
    procs = [rel.start_tbkd("run", "--preset", "smoke", "--n-train", "24", "--n-val", "16", "--seed", "3",
                            "--device", "cpu", "--out", out, "--quiet") for out in outs]
    reports = []
    for out, proc in zip(outs, procs):
        rc, _, err = rel.finish(proc, timeout=400)
        assert rc == 0, err
        reports.append(_comparable(json.loads((out / "report.json").read_text()), str(out)))
    a, b = reports
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"report sections differ: {differ}"
    # the comparison is not vacuous: it holds scores of both models and the baseline
    assert a["teacher"]["localization"]["gradcam"]["n_images"] > 0 and "miou" in a["baseline"]["prior"]
    assert a["student"]["classification"]["auc_tb"] is not None

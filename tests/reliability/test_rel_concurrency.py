"""Case 3 — a second ``tbkd train-teacher`` into a run directory another run holds is refused (exit 2, one
clear line naming the directory), and the first run finishes exactly as if alone.

The first run is paused (SIGSTOP) once it holds the directory, so the second one meets it there however
slow this machine is today, and resumed (SIGCONT) afterwards; pausing changes nothing it computes.
"""
from __future__ import annotations

import os
import signal

import pytest

from tbkd_lib.checkpoint import load_checkpoint
from tbkd_lib.io import read_jsonl


@pytest.mark.slow
def test_second_run_into_a_held_run_dir_is_refused(rel, phantoms, teacher_ref, tmp_path, capsys):
    out = tmp_path / "RUN"
    run_dir = out / "teacher"
    args = ["train-teacher", "--data", phantoms, "--out", out, "--arch", "mobilenet_v3_small", *rel.TINY]
    first = rel.start_tbkd(*args)
    # config.json is written once the lock is held, just before epoch 1
    assert rel.wait_for(lambda: (run_dir / "config.json").exists(), 120, first), rel.finish(first)[2]
    os.kill(first.pid, signal.SIGSTOP)
    try:
        seconds = [rel.start_tbkd(*args, *extra) for extra in ([], ["--resume"])]  # fresh start, resume
        for second in seconds:
            rc, _, err = rel.finish(second, timeout=180)
            assert rc == 2 and "Traceback" not in err, err
            assert str(run_dir) in err and "another run is writing" in err, err
            assert err.startswith("tbkd: error: ") and len(err.strip().splitlines()) == 1, err
        assert first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGCONT)
    rc, stdout, stderr = rel.finish(first)
    assert rc == 0, stderr
    # intact: the same rows and weights as the reference run with the same seed
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rel.strip_timing(rows) == rel.strip_timing(read_jsonl(teacher_ref / "metrics.jsonl"))
    for name in ("best.pt", "last.pt"):
        rel.assert_same_state(load_checkpoint(teacher_ref / name)["model"], load_checkpoint(run_dir / name)["model"], name)
    # once it is finished, a plain rerun (no --resume) is refused too, and names what is there
    rc, _, err = rel.main(capsys, *args)
    assert rc == 2 and str(run_dir) in err and "already holds a run" in err and "--resume" in err, err

"""Case 1 — SIGKILL at a random moment, then ``--resume``: the result equals an uninterrupted run.

Also: SIGKILL in the middle of a checkpoint write leaves the previous ``last.pt`` loadable and nothing
partial under the final name.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from tbkd_lib.checkpoint import load_checkpoint
from tbkd_lib.io import read_json, read_jsonl

ARCH = ["--arch", "mobilenet_v3_small"]


def _kill_and_resume(rel, args: list, run_dir, salt: str, max_delay: float = 1.5):
    """Start ``tbkd ARGS``; once ``run_dir/last.pt`` exists wait a seeded random delay and SIGKILL it
    (mid-epoch, mid-checkpoint-write or during the final evaluation: wherever it lands).

    Retries (fresh directory, shorter delay) when the run finished before the kill landed. Returns
    ``(delay, epoch of last.pt at the kill, stale temp files at the kill, resume CompletedProcess)``.
    """
    rng = rel.rng(salt)
    for attempt in range(4):
        shutil.rmtree(run_dir.parent, ignore_errors=True)
        delay = rng.uniform(0.0, max_delay / 2 ** attempt)
        proc = rel.start_tbkd(*args)
        assert rel.wait_for(lambda: (run_dir / "last.pt").exists(), 120, proc), rel.finish(proc)[2]
        rel.wait_for(lambda: False, delay, proc)  # sleep `delay` s, or less if it exits
        if rel.sigkill(proc):
            break
    else:
        pytest.fail(f"the run always finished before the kill (seed {rel.SEED})")
    killed_at = load_checkpoint(run_dir / "last.pt")["epoch"]
    stale = rel.stale_temp_files(run_dir)
    resumed = rel.run_tbkd(*args, "--resume")
    return delay, killed_at, stale, resumed


def _assert_same_run(rel, ref, run, note: str):
    rows_ref, rows = read_jsonl(ref / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, rel.TINY_EPOCHS + 1)), note
    assert rel.strip_timing(rows) == rel.strip_timing(rows_ref), note
    for name in ("best.pt", "last.pt"):
        a, b = load_checkpoint(ref / name), load_checkpoint(run / name)
        assert a["epoch"] == b["epoch"] and a["best_epoch"] == b["best_epoch"], f"{name} {note}"
        rel.assert_same_state(a["model"], b["model"], f"{name} {note}")
    sa, sb = read_json(ref / "summary.json"), read_json(run / "summary.json")
    assert sa["best_val"] == sb["best_val"] and sa["best_epoch"] == sb["best_epoch"], note
    assert not rel.stale_temp_files(run), f"temp files left after resume {note}"


@pytest.mark.slow
def test_sigkill_train_teacher_then_resume_equals_uninterrupted(rel, phantoms, teacher_ref, tmp_path):
    out = tmp_path / "RUN"
    args = ["train-teacher", "--data", phantoms, "--out", out, *ARCH, *rel.TINY]
    delay, killed_at, stale, resumed = _kill_and_resume(rel, args, out / "teacher", "teacher")
    note = (f"(seed {rel.SEED}, killed {delay:.2f} s after the first last.pt, after epoch {killed_at}, "
            f"torn writes: {stale or 'none'})")
    print("teacher", note)
    assert resumed.returncode == 0, f"{note}\n{resumed.stderr}"
    _assert_same_run(rel, teacher_ref, out / "teacher", note)


@pytest.mark.slow
def test_sigkill_distill_then_resume_equals_uninterrupted(rel, phantoms, teacher_ref, tmp_path):
    teacher = teacher_ref / "best.pt"
    common = ["distill", "--data", phantoms, "--teacher", teacher, *rel.TINY]
    ref = rel.start_tbkd(*common, "--out", tmp_path / "REF")  # the uninterrupted run, alongside the kill
    out = tmp_path / "KILL" / "RUN"
    delay, killed_at, stale, resumed = _kill_and_resume(rel, [*common, "--out", out], out / "student", "student")
    note = (f"(seed {rel.SEED}, killed {delay:.2f} s after the first last.pt, after epoch {killed_at}, "
            f"torn writes: {stale or 'none'})")
    print("student", note)
    rc, _, err = rel.finish(ref)
    assert rc == 0, err
    assert resumed.returncode == 0, f"{note}\n{resumed.stderr}"
    _assert_same_run(rel, tmp_path / "REF" / "student", out / "student", note)
    assert load_checkpoint(out / "student" / "last.pt")["kind"] == "student"


_WRITER = """
import sys, torch
from tbkd_lib.checkpoint import save_checkpoint
path = sys.argv[1]
w = torch.empty(12_000_000)  # 48 MB: a write takes long enough to be hit
for step in range(1, 10**9):
    w.fill_(float(step))
    save_checkpoint(path, {"step": step, "w": w})
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_write_keeps_previous_last_pt(rel, tmp_path):
    """A process rewrites last.pt in a loop (48 MB each). Each time its temp file appears (a write has
    begun) it is SIGKILLed a seeded random few ms later: last.pt is always a complete checkpoint of some
    earlier step, and the torn write exists only as a hidden temp file."""
    rng = rel.rng("ckpt-write")
    path = tmp_path / "last.pt"
    torn, steps = 0, []
    for attempt in range(8):
        proc = rel.start_python(_WRITER, path)
        for _ in range(rng.randint(1, 3)):  # one to three complete saves
            assert proc.stdout.readline().strip(), proc.stderr.read()
        assert rel.wait_for(lambda: rel.stale_temp_files(tmp_path), 30, proc, poll=0.001), proc.stderr.read()
        rel.wait_for(lambda: False, rng.uniform(0.0, 0.03), proc, poll=0.001)
        assert rel.sigkill(proc), proc.stderr.read()
        state = load_checkpoint(path)  # never a CheckpointError: the final name is always complete
        assert torch.equal(state["w"], torch.full_like(state["w"], float(state["step"])))
        steps.append(state["step"])
        temps = rel.stale_temp_files(tmp_path)
        torn += bool(temps)
        assert all(t.startswith(".last.pt.") and t.endswith(".tmp") for t in temps), temps
        for t in temps:
            (tmp_path / t).unlink()
        if torn >= 2:
            break
    assert torn, f"no kill landed inside a write in {attempt + 1} tries (seed {rel.SEED}; steps {steps})"
    print(f"checkpoint writer: {attempt + 1} kill(s), last.pt steps {steps}, torn writes: {torn}")

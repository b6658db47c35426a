"""Fault injection for tbkd: real kills, real bad files, real concurrency — no mocks (except GPU OOM).

Every subprocess runs ``python -m tbkd_lib`` single-threaded (``OMP_NUM_THREADS=1``): on a 2-core machine
shared with other jobs that is several times faster than two contending threads, and it keeps runs that
are compared bit for bit on the same kernel choices.

Random kill moments come from ``random.Random(SEED)``; ``TBKD_RELIABILITY_SEED`` changes the seed (it is
printed in every assertion message, so a failure can be replayed).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SEED = int(os.environ.get("TBKD_RELIABILITY_SEED", "20251128"))

# The tiny teacher / student used by every training fault: the smoke preset with MobileNet-V3-small at
# 32 px in fp32, 12 epochs of 3 batches of 8 on 24 phantom images (~0.15 s an epoch single-threaded,
# 18 MB checkpoints, ~8 s a run of which ~5 s are start-up). val_loss is the monitor, so best.pt moves
# during the run and its equality is a real check.
TINY = ["--preset", "smoke", "--image-size", "32", "--set", "epochs=12", "--set", "max_train_batches=3",
        "--set", "monitor=val_loss", "--set", "lr=0.01", "--set", "amp=none", "--quiet"]
TINY_EPOCHS = 12
TIMING_FIELDS = ("seconds", "train_img_per_s")


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return env


def tbkd_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "tbkd_lib", *map(str, args)]


def run_tbkd(*args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``tbkd ARGS`` to completion; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run(tbkd_cmd(*args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def start_tbkd(*args, cwd=None) -> subprocess.Popen:
    """Start ``tbkd ARGS`` in the background (stdout/stderr to pipes)."""
    return subprocess.Popen(tbkd_cmd(*args), cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_python(code: str, *args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.02) -> bool:
    """Poll ``predicate()`` until true (True), ``timeout`` s pass or ``proc`` exits (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(poll)
    return False


def sigkill(proc: subprocess.Popen) -> bool:
    """SIGKILL ``proc`` (only that pid). True when it was still running, i.e. the kill landed."""
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode == -signal.SIGKILL


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def tbkd_main(capsys, *args) -> tuple[int, str, str]:
    """``tbkd ARGS`` in THIS process (``tbkd_lib.cli.main``): ``(exit status, stdout, stderr)``. For
    checks of a message and exit status that do not need a process of their own (saves ~4 s of start-up)."""
    from tbkd_lib.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def assert_same_state(a: dict, b: dict, what: str = "model") -> None:
    """Two state dicts hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys(), f"{what}: different keys"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensor(s) differ, e.g. {differ[:3]}"


def stale_temp_files(folder: Path) -> list[str]:
    """Leftovers of ``atomic_write_bytes`` (``.NAME.XXXX.tmp``) in ``folder``."""
    return sorted(p.name for p in Path(folder).glob(".*.tmp"))


@pytest.fixture(scope="session")
def rel():
    """The helpers above, as one namespace for the test modules."""
    return SimpleNamespace(
        SEED=SEED, TINY=TINY, TINY_EPOCHS=TINY_EPOCHS, run_tbkd=run_tbkd, start_tbkd=start_tbkd, main=tbkd_main,
        start_python=start_python, wait_for=wait_for, sigkill=sigkill, finish=finish,
        strip_timing=strip_timing, assert_same_state=assert_same_state, stale_temp_files=stale_temp_files,
        rng=lambda salt: random.Random(f"{SEED}/{salt}"))


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """24 train + 12 val phantom images (official TBX11K layout), generated once per session."""
    from tbkd_lib.data import generate_phantoms

    root = tmp_path_factory.mktemp("phantoms") / "PH"
    generate_phantoms(root, n_train=24, n_val=12, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def teacher_ref(tmp_path_factory, phantoms) -> Path:
    """An uninterrupted tiny teacher run (``TINY``, seed 0): ``RUN/teacher`` — the reference of every
    kill / concurrency test and the teacher of the distillation tests."""
    out = tmp_path_factory.mktemp("teacher_ref") / "RUN"
    proc = run_tbkd("train-teacher", "--data", phantoms, "--out", out, "--arch", "mobilenet_v3_small", *TINY)
    assert proc.returncode == 0, proc.stderr
    return out / "teacher"


@pytest.fixture
def one_thread():
    """Single-threaded torch for in-process training (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Cases 7 and 9 — no network, no GPU: clear errors at once, never a hang or a CUDA traceback; GPU
out-of-memory becomes advice to use a smaller batch."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tbkd_lib.errors import TbkdError
from tbkd_lib.models import TBClassifier, _DOWNLOAD_HOST, _network_reachable, build_model
from tbkd_lib.train import TrainConfig, fit


@pytest.fixture(scope="module")
def offline():
    """Skip when the ImageNet weights are cached (nothing to download) or the network is open."""
    from torchvision.models import get_model_weights

    url = get_model_weights("resnet18")["IMAGENET1K_V1"].url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.exists():
        pytest.skip(f"resnet18 IMAGENET1K_V1 is in the torch hub cache ({cached}): no download to fail")
    if _network_reachable(*_DOWNLOAD_HOST):
        pytest.skip(f"{_DOWNLOAD_HOST[0]} is reachable: this machine is not offline")
    return cached


def test_imagenet_weights_offline_fail_fast(offline):
    t0 = time.monotonic()
    with pytest.raises(TbkdError) as info:
        build_model("resnet18", weights="IMAGENET1K_V1")
    seconds = time.monotonic() - t0
    assert seconds < 10, f"took {seconds:.1f} s"
    message = str(info.value)
    assert str(offline) in message and "cannot be reached" in message
    assert "pass the local file path as weights=" in message and "https://download.pytorch.org/" in message


def test_cli_imagenet_weights_offline(rel, phantoms, offline, tmp_path):
    out = tmp_path / "RUN"
    t0 = time.monotonic()
    proc = rel.run_tbkd("train-teacher", "--data", phantoms, "--out", out, "--preset", "smoke",
                        "--set", "weights=IMAGENET1K_V1", "--quiet", timeout=120)
    seconds = time.monotonic() - t0  # includes ~4-5 s of Python/torch start-up on this machine
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "pass the local file path as weights=" in proc.stderr and str(offline) in proc.stderr
    assert seconds < 30, f"took {seconds:.1f} s"
    # nothing half-written: the same directory accepts the corrected command without --resume
    assert [p.name for p in (out / "teacher").iterdir()] in ([], [".lock"])


# ---------------------------------------------------------------------------------------- no GPU
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_gpu(rel, phantoms, tmp_path, capsys):
    """train-teacher, predict, localize and run all refuse at once, with one line, exit 2 (predict and
    localize used to die in torch's CUDA initialisation with a traceback). train-teacher as its own
    process, the others through ``cli.main`` in this one."""
    from tbkd_lib.checkpoint import save_checkpoint

    model = build_model("mobilenet_v3_small", num_classes=3)
    ckpt = save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "model_spec": model.spec,
                                                  "config": {"image_size": 32}})
    image = next((phantoms / "imgs" / "tb").glob("*.png"))
    commands = {
        "train-teacher": ["--data", phantoms, "--out", tmp_path / "T", "--preset", "smoke", "--quiet"],
        "predict": [image, "--checkpoint", ckpt, "--out", tmp_path / "P"],
        "localize": ["--data", phantoms, "--checkpoint", ckpt, "--out", tmp_path / "L"],
        "run": ["--data", phantoms, "--out", tmp_path / "R", "--preset", "smoke", "--quiet"],
    }
    proc = rel.start_tbkd("train-teacher", *commands.pop("train-teacher"), "--device", "cuda")
    results = {name: rel.main(capsys, name, *args, "--device", "cuda") for name, args in commands.items()}
    results["train-teacher"] = rel.finish(proc, timeout=180)
    for name, (rc, _, err) in results.items():
        assert rc == 2 and "Traceback" not in err, f"{name}: {err}"
        assert err == ("tbkd: error: device 'cuda' requested but CUDA is not available (no GPU, or a "
                       "CPU-only torch build); use device='cpu' or 'auto'\n"), f"{name}: {err}"
    assert not (tmp_path / "T").exists() and not (tmp_path / "P").exists() and not (tmp_path / "R" / "teacher").exists()


def test_out_of_memory_becomes_advice(rel, phantoms, tmp_path, monkeypatch, one_thread, capsys):
    """OOM cannot be produced on a CPU: the model's forward raises the real torch.OutOfMemoryError."""
    calls = []

    def forward(self, images):
        calls.append(tuple(images.shape))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TBClassifier, "forward", forward)
    cfg = TrainConfig(arch="mobilenet_v3_small", image_size=32, epochs=1, batch_size=8, accum_steps=1,
                      amp="none", progress=False, device="cpu", n_boot=10)
    with pytest.raises(TbkdError) as info:
        fit(cfg, phantoms, tmp_path / "teacher")
    assert calls and calls[0][0] == 8
    message = str(info.value)
    assert "out of memory at batch_size=8, image_size=32" in message
    assert "smaller --batch-size (e.g. 4) with accum_steps=2" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    # the CLI prints it as one line, exit 2, and the run directory stays usable (lock released)
    from tbkd_lib.cli import main

    rc = main(["train-teacher", "--data", str(phantoms), "--out", str(tmp_path / "CLI"), "--preset", "smoke",
               "--arch", "mobilenet_v3_small", "--image-size", "32", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("tbkd: error: out of memory at batch_size=8") and "Traceback" not in err
    monkeypatch.undo()
    summary = fit(cfg, phantoms, tmp_path / "teacher", resume=True)  # same dir: not locked, not refused
    assert summary["epochs_run"] == 1

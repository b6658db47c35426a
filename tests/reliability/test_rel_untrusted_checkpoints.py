"""Case 6 — untrusted checkpoints: a .pt whose unpickling would run code is refused by ``load_checkpoint``
and by ``tbkd predict`` / ``tbkd localize`` (exit 2, one clear line), and the code never runs; a
truncated checkpoint is a clear error naming the file."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tbkd_lib.checkpoint import load_checkpoint, load_model, save_checkpoint
from tbkd_lib.errors import CheckpointError
from tbkd_lib.models import build_model


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff the code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_checkpoint(path):
    model = build_model("mobilenet_v3_small", num_classes=3)
    save_checkpoint(path, {"model": model.state_dict(), "model_spec": model.spec, "epoch": 1,
                           "config": {"image_size": 32, "scheme": "3class"}, "kind": "teacher"})
    return path


def _evil(path, marker, fmt: str):
    """A checkpoint-shaped file carrying the payload, in one of three on-disk formats."""
    model = build_model("mobilenet_v3_small", num_classes=3)
    state = {"model": model.state_dict(), "model_spec": model.spec, "config": {"image_size": 32},
             "extra": Payload(marker)}
    if fmt == "zip":
        torch.save(state, path)
    elif fmt == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle named .pt
        path.write_bytes(pickle.dumps({"extra": Payload(marker)}, protocol=4))
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_code_carrying_checkpoint_is_refused(fmt, tmp_path, rel):
    marker = tmp_path / "PWNED"
    evil = _evil(tmp_path / f"evil_{fmt}.pt", marker, fmt)
    # the payload is live: an unsafe load (in a separate process) runs it and creates ITS marker; for the
    # plain pickle torch then fails on the magic number, after the code has run
    control = tmp_path / "control"
    live = _evil(tmp_path / f"live_{fmt}.pt", control / "PWNED", fmt)
    control.mkdir()
    proc = rel.start_python("import sys, torch\ntry:\n    torch.load(sys.argv[1], weights_only=False)\n"
                            "except Exception:\n    pass", live)
    assert rel.finish(proc, timeout=120)[0] == 0 and (control / "PWNED").exists()

    for loader in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError) as info:
            loader(evil)
        message = str(info.value)
        assert message.startswith(f"{evil}: refused to load") and "(io.open)" in message, message
        assert "add_safe_globals" not in message  # never advise allow-listing what was refused
    assert not marker.exists()


def test_cli_refuses_code_carrying_checkpoint(rel, phantoms, tmp_path, capsys):
    """``tbkd predict`` as its own process; ``tbkd localize`` through ``cli.main`` in this one."""
    marker = tmp_path / "PWNED"
    evil = _evil(tmp_path / "evil.pt", marker, "zip")
    image = tmp_path / "cxr.png"
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(image)
    proc = rel.start_tbkd("predict", image, "--checkpoint", evil, "--out", tmp_path / "P", "--device", "cpu")
    results = [rel.main(capsys, "localize", "--data", phantoms, "--checkpoint", evil, "--out", tmp_path / "L",
                        "--device", "cpu"), rel.finish(proc, timeout=180)]
    for rc, out, err in results:
        assert rc == 2 and "Traceback" not in err, err
        assert err.startswith(f"tbkd: error: {evil}: refused to load") and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()
    assert not (tmp_path / "P" / "predictions.json").exists() and not (tmp_path / "L").exists()


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.0])
def test_truncated_checkpoint_is_a_clear_error(keep, tmp_path):
    path = _tiny_checkpoint(tmp_path / "best.pt")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    for loader in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError) as info:
            loader(path)
        assert str(info.value).startswith(f"{path}: truncated or not a torch checkpoint"), str(info.value)


def test_cli_truncated_checkpoint(rel, tmp_path, capsys):
    path = _tiny_checkpoint(tmp_path / "best.pt")
    path.write_bytes(path.read_bytes()[:100_000])
    image = tmp_path / "cxr.png"
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(image)
    rc, _, err = rel.main(capsys, "predict", image, "--checkpoint", path, "--out", tmp_path / "P", "--device", "cpu")
    assert rc == 2 and err.startswith(f"tbkd: error: {path}: truncated or not a torch checkpoint"), err

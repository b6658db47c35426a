"""tbkd_lib.checkpoint: atomic save, weights_only load, refusal of code-carrying pickles, load_model."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from tbkd_lib.checkpoint import (get_rng_state, load_checkpoint, load_model, save_checkpoint,
                                 set_rng_state)
from tbkd_lib.errors import CheckpointError
from tbkd_lib.models import build_model


class _RunsCode:
    """Unpickling this would call os.system (creating a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("via", ["torch.save", "pickle"])
def test_refuses_pickle_that_would_run_code(tmp_path, via):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": {}, "evil": _RunsCode(marker)}
    if via == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "could execute code" in msg and "refused" in msg
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": {"w": torch.ones(100)}, "epoch": 3})
    blob = good.read_bytes()
    for name, data in [("trunc.pt", blob[: len(blob) // 2]), ("junk.pt", b"not a checkpoint at all"),
                       ("empty.pt", b""), ("badop.pt", b"\x80\x02\xff\xfe")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_save_is_atomic_and_roundtrips(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    state = {"model": {"w": torch.arange(5.0)}, "epoch": 2, "config": {"lr": 0.1, "arch": "resnet18"},
             "best_metric": None, "kind": "teacher"}
    save_checkpoint(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]  # no temp file left
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["config"] == state["config"]


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.normal()  # leaves a cached gauss
    save_checkpoint(tmp_path / "rng.pt", {"rng": get_rng_state()})
    expect = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_load_model_rebuilds_from_spec(tmp_path):
    model = build_model("resnet18", num_classes=2, input_mode="repeat", cam_layer="backbone.layer3")
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_spec": model.spec, "kind": "teacher"})
    back, ckpt = load_model(path)
    assert back.spec == model.spec and not back.training and ckpt["kind"] == "teacher"
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
    # the same file used as weights= rebuilds the same network
    again = build_model("resnet18", num_classes=2, input_mode="repeat", weights=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), back(x))
    save_checkpoint(tmp_path / "plain.pt", {"weights": torch.ones(1)})
    with pytest.raises(CheckpointError, match="not a tbkd checkpoint"):
        load_model(tmp_path / "plain.pt")

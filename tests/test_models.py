"""tbkd_lib.models: heads, grey input (fold == repeat), normalisation, CAM layers, weights loading."""
import socket
import time

import pytest
import torch
from torch import nn

from tbkd_lib.errors import CheckpointError, ConfigError, TbkdError
from tbkd_lib.models import (IMAGENET_GREY, RANDOM_INIT_NORM, TBClassifier, build_model,
                             capture_features)


@pytest.mark.parametrize("arch,cam,head", [
    ("resnet18", "backbone.layer4", "backbone.fc"),
    ("densenet121", "backbone.features", "backbone.classifier"),
    ("efficientnet_b0", "backbone.features", "backbone.classifier.1"),
])
def test_build_families(arch, cam, head):
    model = build_model(arch, num_classes=3).eval()
    assert isinstance(model, TBClassifier)
    assert model.cam_layer_name == cam and model.cam_layer is model.get_submodule(cam)
    assert model.head_name == head and model.head.out_features == 3
    with torch.no_grad():
        logits = model(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    assert model.spec == {"arch": arch, "num_classes": 3, "input_mode": "fold", "cam_layer": cam,
                          "mean": pytest.approx(RANDOM_INIT_NORM[0]), "std": pytest.approx(RANDOM_INIT_NORM[1])}


def test_num_classes_and_bad_args():
    assert build_model("resnet18", num_classes=2).head.out_features == 2
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet18", num_classes=1)
    with pytest.raises(ConfigError, match="unknown arch"):
        build_model("resnet_nope")
    with pytest.raises(ConfigError, match="input_mode"):
        build_model("resnet18", input_mode="rgb")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        build_model("resnet18")(torch.rand(1, 3, 32, 32))


def test_cam_layer_override():
    model = build_model("resnet18", cam_layer="backbone.layer3")
    assert model.cam_layer_name == "backbone.layer3" and model.gap_layer_name == "backbone.layer4"
    assert model.spec["cam_layer"] == "backbone.layer3"
    with pytest.raises(AttributeError):
        build_model("resnet18", cam_layer="backbone.layer9")


def test_fold_equals_repeat_first_conv():
    """A folded 1-channel conv equals the 3-channel conv on the repeated grey image."""
    torch.manual_seed(0)
    rep = build_model("resnet18", input_mode="repeat").eval()
    fold = build_model("resnet18", input_mode="fold").eval()
    state = rep.state_dict()
    state["backbone.conv1.weight"] = state["backbone.conv1.weight"].sum(1, keepdim=True)
    fold.load_state_dict(state)
    assert fold.backbone.conv1.in_channels == 1 and rep.backbone.conv1.in_channels == 3
    x = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        a = rep.backbone.conv1(rep.normalize(x))
        b = fold.backbone.conv1(fold.normalize(x))
        assert rep.normalize(x).shape[1] == 3 and fold.normalize(x).shape[1] == 1
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(rep(x), fold(x), atol=1e-4)


def test_normalisation_buffers_are_saved():
    model = build_model("resnet18")
    assert {"mean", "std"} <= set(model.state_dict())
    x = torch.full((1, 1, 4, 4), 0.75)
    assert torch.allclose(model.normalize(x), torch.full_like(x, (0.75 - 0.5) / 0.25))


def test_local_torchvision_state_dict(tmp_path):
    """A torchvision state dict (1000-class head, 3-channel conv1) loads, head dropped, conv1 folded."""
    import torchvision

    torch.manual_seed(1)
    tv = torchvision.models.resnet18()
    path = tmp_path / "resnet18_tv.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("resnet18", weights=str(path))
    assert torch.equal(model.backbone.conv1.weight, tv.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    assert model.spec["mean"] == pytest.approx(IMAGENET_GREY[0])
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 5, 7, 7)}, bad)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_model("resnet18", weights=str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        build_model("resnet18", weights=str(tmp_path / "missing.pth"))


def test_capture_features_and_cam():
    model = build_model("resnet18").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits, feats = model.forward_features(x, ["backbone.layer3", "backbone.layer4"])
        assert feats["backbone.layer4"].shape == (2, 512, 2, 2)
        # CAM averaged over positions + bias == the logit (GAP + linear head)
        cam = model.class_activation_map(feats["backbone.layer4"], torch.tensor([2, 0]))
        expect = cam.mean(dim=(1, 2)) + model.head.bias[[2, 0]]
        assert torch.allclose(expect, logits[[0, 1], [2, 0]], atol=1e-5)
    # hooks are removed afterwards
    assert not model.backbone.layer4._forward_hooks
    with pytest.raises(ConfigError):
        with capture_features(model, ["backbone.nope"]):
            pass


def _reachable(host="download.pytorch.org", port=443, timeout=3.0):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def test_weights_by_name_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache; the network is not mocked
    if _reachable():
        pytest.skip("download.pytorch.org is reachable here")
    t0 = time.perf_counter()
    with pytest.raises(TbkdError) as info:
        build_model("resnet18", weights="DEFAULT")
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    assert "networked machine" in msg and "local file path" in msg and "resnet18-" in msg
    with pytest.raises(ConfigError, match="unknown weights"):
        build_model("resnet18", weights="IMAGENET9K")

"""Case 5 — numerics: a diverging run stops with a precise error and keeps its last good checkpoint;
degenerate saliency maps (all zero, constant) score IoU 0 with no NaN anywhere in the results."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tbkd_lib.checkpoint import load_checkpoint, load_model
from tbkd_lib.data import CXRDataset, load_records
from tbkd_lib.errors import TbkdError
from tbkd_lib.evaluation import LocalizeConfig, evaluate_localization, evaluate_prior_baseline
from tbkd_lib.io import read_jsonl
from tbkd_lib.locmetrics import prior_map
from tbkd_lib.models import build_model
from tbkd_lib.pipeline import localization_inputs
from tbkd_lib.train import TrainConfig, fit

DIVERGE = ["--preset", "smoke", "--arch", "mobilenet_v3_small", "--image-size", "32", "--set", "amp=none",
           "--set", "lr=1e30", "--quiet"]


def test_lr_1e30_stops_with_a_precise_error(rel, phantoms, tmp_path, capsys, one_thread):
    """lr = 1e30: the weights explode. With 3 steps an epoch the NEXT loss is NaN (caught in training);
    with 1 step an epoch the explosion is first seen by the validation pass (was a sklearn traceback).
    The first as its own process, the second through ``cli.main`` in this one."""
    args = {n: ["train-teacher", "--data", phantoms, "--out", tmp_path / f"R{n}", *DIVERGE,
                "--set", f"max_train_batches={n}", "--set", "epochs=2"] for n in (3, 1)}
    proc = rel.start_tbkd(*args[3])
    results = {1: rel.main(capsys, *args[1]), 3: rel.finish(proc, timeout=180)}
    for n, (rc, _, err) in sorted(results.items()):
        assert rc == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("tbkd: error: "), err
        if n == 3:
            assert re.search(r"non-finite training loss \((nan|-?inf)\) at epoch 1, step [23]/3", err), err
        else:
            assert re.search(r"non-finite validation logits after epoch 1 \(\d+ of 12 images\)", err), err
        assert "no epoch had finished: there is no last.pt" in err and "lower lr" in err
        assert not (tmp_path / f"R{n}" / "teacher" / "last.pt").exists()


class NaNFromEpoch(torch.utils.data.Dataset):
    """Real phantom images, except that from epoch ``start`` on every image is NaN (a decoder gone bad)."""

    def __init__(self, base: CXRDataset, start: int | None):
        self.base, self.start, self.epoch = base, start, 0
        self.labels = base.labels

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = self.base[i]
        if self.start is not None and self.epoch >= self.start:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_nan_images_stop_training_and_keep_last_good_checkpoint(phantoms, tmp_path, one_thread):
    cfg = TrainConfig(arch="mobilenet_v3_small", image_size=32, epochs=4, batch_size=8, max_train_batches=3,
                      warmup_epochs=0.0, amp="none", n_boot=20, progress=False, device="cpu", augment=False)
    train = CXRDataset(load_records(phantoms, "train"), image_size=32)
    val = CXRDataset(load_records(phantoms, "val"), image_size=32)
    run = tmp_path / "teacher"
    with pytest.raises(TbkdError, match=r"non-finite training loss \(nan\) at epoch 3, step 1/3; "
                                        r"stopped \(last\.pt still holds epoch 2\)"):
        fit(cfg, {"train": NaNFromEpoch(train, 3), "val": val}, run)
    last = load_checkpoint(run / "last.pt")  # the last good epoch, loadable, finite
    assert last["epoch"] == 2
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    model, _ = load_model(run / "last.pt")
    assert torch.isfinite(model(torch.rand(2, 1, 32, 32))).all()
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    # nothing was lost: with the data fixed, --resume continues from epoch 3 to the end
    summary = fit(cfg, {"train": NaNFromEpoch(train, None), "val": val}, run, resume=True)
    assert summary["epochs_run"] == 4 and load_checkpoint(run / "last.pt")["epoch"] == 4
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------- saliency
def _walk_numbers(obj, where="result"):
    """Every number in a nested dict/list, with its path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_numbers(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield where, obj


def _assert_no_nan(result: dict):
    bad = [w for w, v in _walk_numbers(result) if not math.isfinite(v)]
    assert not bad, f"non-finite values at {bad}"
    json.dumps(result, allow_nan=False)


@pytest.fixture(scope="module")
def scored(phantoms):
    """Phantom TB images at 32 px with their boxes: val (scored) and train (calibration)."""
    val = localization_inputs(load_records(phantoms, "val"), 32)
    cal = localization_inputs(load_records(phantoms, "train"), 32)
    assert len(val[0]) >= 2 and len(cal[0]) >= 2
    return (val[0], val[1]), (cal[0], cal[1])


def _model(kind: str):
    """ResNet-18 at 32 px: layer4 is 1 x 1, so Grad-CAM upsampled to 32 x 32 is CONSTANT (the TB row of
    the head positive) or ALL ZERO (the head zeroed: no gradient reaches layer4)."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        if kind == "constant":
            model.head.weight[-1] = 1.0 / model.head.in_features
    return model


@pytest.mark.parametrize("kind", ["zero", "constant"])
@pytest.mark.parametrize("tau", ["auto", "otsu", "p90", 0.5])
def test_degenerate_saliency_scores_zero_without_nan(kind, tau, scored, one_thread):
    (images, boxes), calibration = scored
    cfg = LocalizeConfig(methods=("gradcam",), tau=tau, n_boot=50, faithfulness=True, faithfulness_steps=4)
    result, maps = evaluate_localization(_model(kind), (images, boxes), "gradcam", cfg, calibration=calibration,
                                         return_maps=True)
    sal = maps["saliency"].flatten(1)
    lo, hi = sal.min(dim=1).values, sal.max(dim=1).values
    if kind == "zero":
        assert bool((sal == 0).all())
    else:  # constant up to float32 rounding of the bilinear upsampling (a few ulps), and positive
        assert bool((lo > 0).all()) and bool((hi - lo <= 1e-6 * hi).all())
    assert not maps["masks"].any(), "a constant map must not give a foreground (rounding noise stretched)"
    assert result["n_images"] == len(images)
    assert result["miou"] == 0.0 and result["miou_ci95"] == [0.0, 0.0]
    assert result["hit_rate"] == 0.0 or kind == "constant"  # a constant map's argmax is pixel (0, 0)
    assert max(result["iou_vs_tau"]["miou"]) == 0.0
    _assert_no_nan(result)


@pytest.mark.parametrize("prior", ["zero", "constant"])
def test_degenerate_prior_baseline_scores_zero_without_nan(prior, scored):
    (_, boxes), (_, cal_boxes) = scored
    reference = prior_map(cal_boxes, 32, 32)
    flat = torch.zeros_like(reference) if prior == "zero" else torch.full_like(reference, 0.37)
    for tau in ("auto", "otsu", "p90", 0.0):
        result = evaluate_prior_baseline(flat, boxes, LocalizeConfig(methods=("gradcam",), tau=tau, n_boot=50),
                                         calibration_boxes=cal_boxes)
        assert result["miou"] == 0.0 and result["n_images"] == len(boxes), (tau, result)
        if prior == "zero":  # no positive value: no hit, no energy
            assert result["hit_rate"] == 0.0 and result["energy_pointing"] == 0.0
        _assert_no_nan(result)

"""tbkd_lib.evaluation: end-to-end numbers on a model whose saliency is known, and the rule that
the scored split's boxes are never read before tau is fixed."""
from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from tbkd_lib import evaluation
from tbkd_lib.config import config_from_dict, config_to_dict
from tbkd_lib.errors import ConfigError
from tbkd_lib.evaluation import (LocalizeConfig, compute_saliency, evaluate_localization,
                                 evaluate_prior_baseline)
from tbkd_lib.locmetrics import prior_map

H = W = 16
BOX_A = [4.0, 4.0, 12.0, 12.0]     # rows/cols 4–11, 64 px
BOX_B = [8.0, 8.0, 16.0, 16.0]     # rows/cols 8–15, 64 px; A ∩ B = 16 px, A ∪ B = 112 px


class MapNet(nn.Module):
    """TB logit = sum(weight ⊙ x): |d logit / dx| = weight, whatever the image.

    weight: 1.0 on BOX_A, 0.5 on a 2-px ring around it, 0.2 elsewhere → normalised 1 / 0.375 / 0.
    """

    def __init__(self):
        super().__init__()
        w = torch.full((H, W), 0.2)
        w[2:14, 2:14] = 0.5
        w[4:12, 4:12] = 1.0
        self.register_buffer("weight", w)
        self.cam_layer = nn.Identity()
        self.cam_layer_name = "cam_layer"

    def forward(self, images):
        tb = (self.cam_layer(images)[:, 0] * self.weight).sum(dim=(1, 2))
        return torch.stack([torch.zeros_like(tb), -tb, tb], dim=1)


class Tripwire(Sequence):
    """Box lists that fail the test if their content is read before ``armed`` is set."""

    def __init__(self, boxes, state):
        self.boxes, self.state = boxes, state

    def __len__(self):
        return len(self.boxes)

    def __getitem__(self, i):
        assert self.state["tau_fixed"], "scored boxes read before tau was fixed"
        return self.boxes[i]


def scored_split():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, H, W, generator=g)
    boxes = [torch.tensor([BOX_A]), torch.tensor([BOX_B]), torch.zeros(0, 4)]  # image 3: no box
    return images, boxes


def calibration_split():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 1, H, W, generator=g), [torch.tensor([BOX_A]), torch.tensor([BOX_A])]


def cfg(**kw):
    base = dict(methods=("saliency",), tau=0.5, n_boot=100, batch_size=2, faithfulness=False,
                method_kwargs={"saliency": {"smooth_sigma": 0}})
    base.update(kw)
    return LocalizeConfig(**base)


def test_scores_by_hand_with_a_fixed_tau():
    # saliency mass: 64·1 (A) + 80·0.5 (ring) + 112·0.2 (rest) = 126.4.
    # tau 0.5 → mask = BOX_A. Image 1: IoU 1, argmax (4, 4) inside, energy 64 / 126.4.
    # Image 2 (BOX_B): IoU 16/112, argmax outside, energy (16·1 + 20·0.5 + 28·0.2) / 126.4 = 0.25.
    # Image 3 has no box.
    res = evaluate_localization(MapNet(), scored_split(), "saliency", cfg())
    assert res["n_images"] == 2 and res["n_attributed"] == 3 and res["n_boxes"] == 2
    assert res["miou"] == pytest.approx((1 + 1 / 7) / 2)
    assert res["box_iou"] == pytest.approx((1 + 1 / 7) / 2)
    assert res["hit_rate"] == pytest.approx(0.5)
    assert res["energy_pointing"] == pytest.approx((64 / 126.4 + 0.25) / 2)
    assert res["tau"] == 0.5 and res["tau_source"] == "fixed"
    assert res["target"] == 2 and res["method"] == "saliency"
    assert res["pred_boxes_per_image"] == 1.0
    lo, hi = res["miou_ci95"]
    assert lo <= res["miou"] <= hi
    curve = dict(zip(res["iou_vs_tau"]["tau"], res["iou_vs_tau"]["miou"]))
    assert curve[0.35] == pytest.approx((64 / 144 + 36 / 172) / 2)   # ring included
    assert curve[0.4] == pytest.approx((1 + 1 / 7) / 2)
    json.dumps(res, allow_nan=False)
    assert res["seconds"] >= res["seconds_per_image"] > 0


def test_auto_tau_is_tuned_on_calibration_and_never_reads_scored_boxes(monkeypatch):
    state = {"tau_fixed": False}
    original = evaluation.resolve_tau

    def spy(*args, **kwargs):
        choice = original(*args, **kwargs)
        state["tau_fixed"] = True
        return choice

    monkeypatch.setattr(evaluation, "resolve_tau", spy)
    images, boxes = scored_split()
    res = evaluate_localization(MapNet(), (images, Tripwire(boxes, state)), "saliency",
                                cfg(tau="auto"), calibration=calibration_split())
    # calibration GT = BOX_A: every tau ≥ 0.375 gives IoU 1; the first on the grid is 0.4
    assert res["tau"] == pytest.approx(0.4)
    assert res["tau_source"] == "tuned on calibration split (2 images)"
    assert res["miou"] == pytest.approx((1 + 1 / 7) / 2)
    assert res["calibration_iou_vs_tau"]["miou"][7] == pytest.approx(1.0)   # tau 0.4


def test_tau_does_not_change_when_scored_boxes_change():
    images, boxes = scored_split()
    other = [torch.tensor([[0.0, 0.0, 3.0, 3.0]]), torch.tensor([[10.0, 0.0, 16.0, 4.0]]),
             torch.tensor([BOX_B])]
    a = evaluate_localization(MapNet(), (images, boxes), "saliency", cfg(tau="auto"),
                              calibration=calibration_split())
    b = evaluate_localization(MapNet(), (images, other), "saliency", cfg(tau="auto"),
                              calibration=calibration_split())
    assert a["tau"] == b["tau"] and a["miou"] != b["miou"]
    for tau in ("otsu", "p90"):
        c = evaluate_localization(MapNet(), (images, boxes), "saliency", cfg(tau=tau))
        d = evaluate_localization(MapNet(), (images, other), "saliency", cfg(tau=tau))
        assert c["tau"] == d["tau"]


def test_auto_without_calibration_is_an_error():
    with pytest.raises(ValueError, match="calibration"):
        evaluate_localization(MapNet(), scored_split(), "saliency", cfg(tau="auto"))
    with pytest.raises(ValueError, match="calibration"):
        evaluate_prior_baseline(torch.ones(H, W), scored_split()[1], cfg(tau="auto"))


def test_probability_cutoff_empties_unlikely_masks():
    images, boxes = scored_split()
    res = evaluate_localization(MapNet(), (images, boxes, torch.tensor([0.9, 0.1, 0.9])), "saliency",
                                cfg(prob_cutoff=0.5))
    assert res["miou"] == pytest.approx(0.5)          # image 2 (p = 0.1) scores 0
    assert res["prob_cutoff"] == 0.5


def test_max_images_and_faithfulness_keys():
    res = evaluate_localization(MapNet(), scored_split(), "saliency",
                                cfg(max_images=2, faithfulness=True, faithfulness_steps=4))
    assert res["n_attributed"] == 2 and res["n_images"] == 2
    for key in ("deletion_auc", "insertion_auc"):
        assert 0.0 <= res[key] <= 1.0
    assert res["faithfulness_n_images"] == 2
    json.dumps(res, allow_nan=False)


def test_faithfulness_on_the_first_films_only():
    """faithfulness_max_images=1: the curves average the first scored film alone, which is what
    scoring that film by itself gives; mIoU still averages every film."""
    full = evaluate_localization(MapNet(), scored_split(), "saliency", cfg(faithfulness=True, faithfulness_steps=4,
                                                                           faithfulness_max_images=1))
    images, boxes = scored_split()
    first = evaluate_localization(MapNet(), (images[:1], boxes[:1]), "saliency",
                                  cfg(faithfulness=True, faithfulness_steps=4))
    assert full["faithfulness_n_images"] == 1 and full["n_images"] == 2
    assert full["deletion_auc"] == pytest.approx(first["deletion_auc"], abs=1e-6)
    assert full["insertion_auc"] == pytest.approx(first["insertion_auc"], abs=1e-6)
    with pytest.raises(ConfigError, match="faithfulness_max_images"):
        cfg(faithfulness_max_images=0)


def test_gradcam_path_runs_end_to_end():
    res = evaluate_localization(MapNet(), scored_split(), "gradcam",
                                cfg(methods=("gradcam",), tau="otsu", method_kwargs={}))
    assert res["n_images"] == 2 and res["miou"] is not None
    json.dumps(res, allow_nan=False)


def test_compute_saliency_batches_like_one_call():
    images, _ = scored_split()
    targets = torch.tensor([2, 2, 2])
    c = cfg(batch_size=2)
    out = compute_saliency(MapNet(), images, targets, "saliency", c)
    assert out.shape == (3, H, W)
    torch.testing.assert_close(out[0], MapNet().weight)


def test_prior_baseline_by_hand():
    # prior from train boxes A, A, B: A-only 2/3, A∩B 1, B-only 1/3, else 0
    prior = prior_map([torch.tensor([BOX_A]), torch.tensor([BOX_A]), torch.tensor([BOX_B])], H, W)
    scored = [torch.tensor([BOX_A]), torch.tensor([BOX_B])]
    res = evaluate_prior_baseline(prior, scored, cfg(tau=0.5))
    assert res["miou"] == pytest.approx((1 + 1 / 7) / 2)       # mask = BOX_A
    assert res["hit_rate"] == 1.0                              # argmax (8, 8) lies in A and B
    assert res["energy_pointing"] == pytest.approx((0.75 + 0.5) / 2)
    assert res["deletion_auc"] is None and res["method"] == "prior"
    # tuned on the train boxes: tau in [1/3, 2/3) gives (1 + 1 + 1/7)/3, the best; first grid tau 0.35
    auto = evaluate_prior_baseline(prior, scored, cfg(tau="auto"),
                                   [torch.tensor([BOX_A]), torch.tensor([BOX_A]), torch.tensor([BOX_B])])
    assert auto["tau"] == pytest.approx(0.35)
    assert set(auto) == set(evaluate_localization(MapNet(), scored_split(), "saliency", cfg()))
    json.dumps(auto, allow_nan=False)


def test_config_validates_and_roundtrips_through_json():
    c = LocalizeConfig(method_kwargs=(("ig", {"n_steps": 8}),))
    assert c.method_kwargs == {"ig": {"n_steps": 8}} and c.kwargs_for("ig") == {"n_steps": 8}
    assert c.taus[0] == 0.05 and c.taus[-1] == 0.95 and len(c.taus) == 19
    d = json.loads(json.dumps(config_to_dict(c)))
    assert config_from_dict(LocalizeConfig, d) == c
    for bad in (dict(methods=("lime",)), dict(tau="median"), dict(taus=(1.5,)),
                dict(method_kwargs={"ig": {"steps": 3}}), dict(batch_size=0), dict(prob_cutoff=2.0)):
        with pytest.raises(ConfigError):
            LocalizeConfig(**bad)

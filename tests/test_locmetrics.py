"""tbkd_lib.locmetrics: IoU, pointing, energy, baselines — on hand-made masks and boxes."""
from __future__ import annotations

import math

import pytest
import torch

from tbkd_lib.locmetrics import (box_iou_best, centre_box_saliency, energy_pointing, iou_vs_tau,
                                 mask_iou, miou, pointing_game, prior_map, saliency_share_in_boxes,
                                 summarize)
from tbkd_lib.protocol import boxes_to_mask, gt_masks_from_boxes, normalize_saliency, threshold


def gt_box_10x10():
    return gt_masks_from_boxes([torch.tensor([[2.0, 2.0, 6.0, 6.0]])], 10, 10)   # 16 px


def test_mask_iou_by_hand():
    gt = gt_box_10x10()
    pred = torch.zeros(1, 10, 10, dtype=torch.bool)
    pred[0, 4:8, 4:8] = True                  # rows 4–7 × cols 4–7: 16 px, overlap 2×2 = 4
    assert mask_iou(pred, gt).tolist() == pytest.approx([4 / 28])
    assert mask_iou(gt, gt).tolist() == [1.0]


def test_mask_iou_empty_cases_are_defined():
    gt = gt_box_10x10()
    empty = torch.zeros(1, 10, 10, dtype=torch.bool)
    assert mask_iou(empty, gt).tolist() == [0.0]        # nothing predicted, TB there
    assert mask_iou(empty, empty).tolist() == [1.0]     # nothing predicted, nothing there


def test_miou_averages_only_images_with_boxes():
    gt = torch.cat([gt_box_10x10(), torch.zeros(1, 10, 10, dtype=torch.bool), gt_box_10x10()])
    pred = torch.zeros(3, 10, 10, dtype=torch.bool)
    pred[0, 4:8, 4:8] = True
    pred[2] = gt[2]
    assert miou(pred, gt) == pytest.approx((4 / 28 + 1.0) / 2)
    assert math.isnan(miou(pred, torch.zeros_like(gt)))


def test_box_iou_best_per_gt_box():
    gt = torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    pred = torch.tensor([[4.0, 4.0, 8.0, 8.0], [2.0, 2.0, 6.0, 5.0]])
    # box 1: best of 4/28 and 12/16; box 2: no overlap
    assert box_iou_best(pred, gt).tolist() == pytest.approx([0.75, 0.0])
    assert box_iou_best(torch.zeros(0, 4), gt).tolist() == [0.0, 0.0]


def test_pointing_game_hits_ties_and_blank_maps():
    gt = torch.cat([gt_box_10x10()] * 4)
    s = torch.zeros(4, 10, 10)
    s[0, 3, 3] = 1.0                    # inside → hit
    s[1, 8, 8] = 1.0                    # outside → miss
    s[2, 0, 0] = s[2, 3, 3] = 1.0       # tie: first in raster order is (0, 0) → miss
    # s[3] all zeros → points nowhere → miss
    assert pointing_game(s, gt).tolist() == [True, False, False, False]


def test_energy_pointing_share_inside_boxes():
    gt = torch.cat([gt_box_10x10()] * 3)
    s = torch.zeros(3, 10, 10)
    s[0, 3, 3], s[0, 8, 8] = 3.0, 1.0   # 3 of 4 inside
    s[1] = 1.0                          # uniform: 16/100
    assert energy_pointing(s, gt).tolist() == pytest.approx([0.75, 0.16, 0.0])


def test_constant_saliency_gives_iou_zero_and_no_nan_anywhere():
    gt = gt_box_10x10()
    s = torch.full((1, 10, 10), 0.7)
    norm = normalize_saliency(s)
    masks = threshold(norm, 0.5)
    assert torch.equal(norm, torch.zeros_like(norm))
    assert mask_iou(masks, gt).tolist() == [0.0]
    curve = iou_vs_tau(norm, gt, (0.0, 0.5, 0.95))
    assert curve.tolist() == [0.0, 0.0, 0.0]
    assert energy_pointing(s, gt).tolist() == pytest.approx([0.16])
    for v in (norm, masks.float(), curve, energy_pointing(norm, gt), pointing_game(norm, gt).float()):
        assert torch.isfinite(v).all()


def test_iou_vs_tau_curve():
    s = torch.zeros(1, 10, 10)
    s[0, 2:6, 2:6] = 1.0
    s[0, 6:8, 2:6] = 0.5                # 8 extra pixels at 0.5
    gt = gt_box_10x10()
    assert iou_vs_tau(s, gt, (0.25, 0.75)).tolist() == pytest.approx([16 / 24, 1.0])
    assert all(math.isnan(v) for v in iou_vs_tau(s, torch.zeros_like(gt), (0.5,)).tolist())


def test_summarize_uses_bootstrap_and_is_seeded():
    v = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, float("nan")])
    a = summarize(v, seed=0, n_boot=200)
    b = summarize(v, seed=0, n_boot=200)
    assert a == b and a["mean"] == pytest.approx(0.6) and a["n"] == 5
    lo, hi = a["ci95"]
    assert 0.0 <= lo <= 0.6 <= hi <= 1.0
    assert summarize([], seed=0) == {"mean": None, "ci95": None, "n": 0}


def test_saliency_share_in_boxes_is_energy_pointing_on_the_cue_box():
    s = torch.zeros(2, 10, 10)
    s[:, 0, 0] = 1.0
    s[:, 5, 5] = 3.0
    share = saliency_share_in_boxes(s, [torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.zeros(0, 4)])
    assert share.tolist() == pytest.approx([0.25, 0.0])


def test_prior_map_is_box_frequency_over_train_images():
    boxes = [torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]]),
             torch.zeros(0, 4)]                                  # the empty entry is skipped
    p = prior_map(boxes, 4, 4)
    assert p.dtype == torch.float32 and p.shape == (4, 4)
    assert p[0, 0] == 0.5 and p[1, 1] == 1.0 and p[2, 2] == 0.5 and p[3, 3] == 0.0
    with pytest.raises(ValueError):
        prior_map([torch.zeros(0, 4)], 4, 4)


def test_centre_box_saliency():
    c = centre_box_saliency(8, 8, 0.5)
    assert torch.equal(c, boxes_to_mask(torch.tensor([[2.0, 2.0, 6.0, 6.0]]), 8, 8).float())
    assert centre_box_saliency(4, 6, 1.0).sum().item() == 24


def test_paired_difference_by_hand():
    from tbkd_lib.locmetrics import paired_difference

    a = [0.1, 0.2, 0.3, float("nan")]
    b = [0.2, 0.4, 0.3, 0.9]
    r = paired_difference(a, b, seed=0, n_boot=200)
    assert r["n"] == 3 and r["diff"] == pytest.approx((0.1 + 0.2 + 0.0) / 3)
    lo, hi = r["ci95"]
    assert 0.0 <= lo <= r["diff"] <= hi <= 0.2 + 1e-12      # resampled means of {0.1, 0.2, 0.0}
    same = paired_difference([0.5, 0.1], [0.5, 0.1], n_boot=50)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert paired_difference([], [], n_boot=10) == {"diff": None, "ci95": None, "n": 0}
    with pytest.raises(ValueError, match="pair"):
        paired_difference([1.0], [1.0, 2.0])

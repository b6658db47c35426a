"""tbkd_lib.protocol: every step of normalise → tau → mask → boxes, with exact numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tbkd_lib.errors import ConfigError
from tbkd_lib.protocol import (DEFAULT_TAUS, apply_probability_cutoff, boxes_from_masks, boxes_to_mask,
                               gt_masks_from_boxes, normalize_saliency, otsu_tau, parse_tau_spec,
                               percentile_tau, resolve_tau, threshold, tune_tau)


def test_normalize_is_per_image_min_max():
    s = torch.tensor([[[1.0, 3.0], [5.0, 9.0]], [[-2.0, 0.0], [0.0, 2.0]]])
    out = normalize_saliency(s)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(out[1], torch.tensor([[0.0, 0.5], [0.5, 1.0]]))
    assert out.dtype == torch.float32


def test_constant_map_normalises_to_zeros_without_nan():
    s = torch.stack([torch.full((5, 5), 3.0), torch.zeros(5, 5)])
    out = normalize_saliency(s)
    assert torch.equal(out, torch.zeros(2, 5, 5))
    with pytest.raises(FloatingPointError):
        normalize_saliency(torch.tensor([[[float("nan"), 1.0]]]))


def test_otsu_on_a_bimodal_map_splits_the_modes_exactly():
    # values 0.2 and 0.8: bin(v) = ceil(256 v) - 1 → 51 and 204. Every split between them has the
    # same between-class variance; the first maximiser is k = 51 → tau = 52/256.
    s = torch.full((2, 10, 10), 0.2)
    s[0, :, 6:] = 0.8
    s[1, 7:, :] = 0.8
    tau = otsu_tau(s)
    torch.testing.assert_close(tau, torch.tensor([52 / 256, 52 / 256]))
    masks = threshold(s, tau)
    assert torch.equal(masks, s == 0.8)


def test_otsu_with_noisy_modes_lands_in_the_gap():
    g = torch.Generator().manual_seed(0)
    low = 0.25 + 0.03 * torch.randn(300, generator=g)
    high = 0.7 + 0.03 * torch.randn(100, generator=g)
    s = torch.cat([low, high]).clamp(0, 1).reshape(1, 20, 20)
    tau = float(otsu_tau(s))
    assert low.max() < tau < high.min()


def test_otsu_on_a_constant_map_gives_an_empty_mask():
    s = normalize_saliency(torch.ones(1, 6, 6))
    assert otsu_tau(s).tolist() == [1.0]
    assert not threshold(s, otsu_tau(s)).any()


def test_percentile_tau_matches_numpy_linear_interpolation():
    s = (torch.arange(100, dtype=torch.float32) / 99).reshape(1, 10, 10)
    # position 0.9 * 99 = 89.1 → 89.1 / 99 = 0.9
    assert percentile_tau(s, 90).item() == pytest.approx(0.9)
    g = torch.Generator().manual_seed(1)
    r = torch.rand(3, 7, 9, generator=g)
    np.testing.assert_allclose(percentile_tau(r, 73.5).numpy(),
                               np.percentile(r.flatten(1).numpy(), 73.5, axis=1), rtol=1e-6)
    # strict threshold at p90 keeps the top 10 pixels of 100 distinct values
    assert threshold(s, percentile_tau(s, 90)).sum().item() == 10


def test_threshold_is_strict_and_takes_scalar_or_per_image_tau():
    s = torch.tensor([[[0.2, 0.5, 0.7]], [[0.2, 0.5, 0.7]]])
    assert threshold(s, 0.5).tolist() == [[[False, False, True]], [[False, False, True]]]
    assert threshold(s, torch.tensor([0.1, 0.6])).tolist() == [[[True, True, True]],
                                                                [[False, False, True]]]
    with pytest.raises(ValueError, match="tau"):
        threshold(s, torch.tensor([0.1, 0.2, 0.3]))


def test_probability_cutoff_empties_masks_of_unlikely_images():
    masks = torch.ones(3, 2, 2, dtype=torch.bool)
    out = apply_probability_cutoff(masks, torch.tensor([0.9, 0.2, 0.5]), 0.5)
    assert out.flatten(1).any(1).tolist() == [True, False, True]
    assert apply_probability_cutoff(masks, None, None) is masks


def test_boxes_from_masks_two_blobs_exact_coordinates():
    m = torch.zeros(2, 10, 10, dtype=torch.bool)
    m[0, 1:4, 2:5] = True          # rows 1-3, cols 2-4  → [2, 1, 5, 4]
    m[0, 6:9, 6:10] = True         # rows 6-8, cols 6-9  → [6, 6, 10, 9]
    m[1, 5, 5] = True              # one pixel → [5, 5, 6, 6]
    boxes = boxes_from_masks(m)
    assert boxes[0].tolist() == [[2.0, 1.0, 5.0, 4.0], [6.0, 6.0, 10.0, 9.0]]
    assert boxes[1].tolist() == [[5.0, 5.0, 6.0, 6.0]]
    assert boxes[0].dtype == torch.float32
    assert [b.shape[0] for b in boxes_from_masks(m, min_area=2)] == [2, 0]
    assert boxes_from_masks(torch.zeros(1, 4, 4, dtype=torch.bool))[0].shape == (0, 4)


def test_boxes_from_masks_connectivity():
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 1] = True   # diagonal neighbours
    assert boxes_from_masks(m)[0].tolist() == [[0.0, 0.0, 2.0, 2.0]]
    assert boxes_from_masks(m, connectivity=4)[0].tolist() == [[0.0, 0.0, 1.0, 1.0],
                                                               [1.0, 1.0, 2.0, 2.0]]


def test_boxes_to_mask_exclusive_edges_and_pixel_centres():
    m = boxes_to_mask(torch.tensor([[2.0, 2.0, 6.0, 6.0]]), 10, 10)
    assert m.sum().item() == 16
    assert m[2:6, 2:6].all() and not m[6, 2] and not m[2, 6]
    # fractional box: centres 1.5 and 2.5 are inside [1.5, 3.5) → columns/rows 1 and 2
    f = boxes_to_mask(torch.tensor([[1.5, 1.5, 3.5, 3.5]]), 5, 5)
    assert torch.nonzero(f).tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    union = boxes_to_mask(torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]]), 4, 4)
    assert union.sum().item() == 7
    assert not boxes_to_mask(torch.zeros(0, 4), 3, 3).any()


def test_boxes_roundtrip_through_masks():
    boxes = torch.tensor([[1.0, 2.0, 4.0, 7.0], [6.0, 0.0, 9.0, 3.0]])
    m = boxes_to_mask(boxes, 10, 10)
    assert boxes_from_masks(m[None])[0].tolist() == [[6.0, 0.0, 9.0, 3.0], [1.0, 2.0, 4.0, 7.0]]


def test_gt_masks_from_boxes_stacks_one_mask_per_image():
    gt = gt_masks_from_boxes([torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.zeros(0, 4),
                              [[1, 1, 2, 3]]], 4, 4)
    assert gt.shape == (3, 4, 4) and gt.dtype == torch.bool
    assert gt.flatten(1).sum(1).tolist() == [4, 0, 2]


def test_tune_tau_maximises_miou_over_the_given_images():
    # saliency 1.0 on the GT box, 0.6 on a ring around it, 0 elsewhere: taus below 0.6 add the ring
    s = torch.zeros(1, 10, 10)
    s[0, 2:8, 2:8] = 0.6
    s[0, 3:7, 3:7] = 1.0
    gt = torch.zeros(1, 10, 10, dtype=torch.bool)
    gt[0, 3:7, 3:7] = True
    best, curve = tune_tau(s, gt, (0.3, 0.5, 0.7, 0.9))
    assert best == 0.7
    torch.testing.assert_close(curve, torch.tensor([16 / 36, 16 / 36, 1.0, 1.0]))
    with pytest.raises(ValueError, match="no calibration image"):
        tune_tau(s, torch.zeros_like(gt), (0.5,))


def test_parse_and_resolve_tau():
    assert parse_tau_spec(0.3) == ("fixed", 0.3)
    assert parse_tau_spec("p90") == ("percentile", 90.0)
    assert parse_tau_spec("otsu") == ("otsu", None)
    for bad in ("p150", "median", 1.5, True):
        with pytest.raises(ConfigError):
            parse_tau_spec(bad)
    s = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    fixed = resolve_tau(0.4, s)
    assert fixed.tau.tolist() == pytest.approx([0.4] * 3) and fixed.source == "fixed"
    assert torch.equal(resolve_tau("otsu", s).tau, otsu_tau(s))
    with pytest.raises(ValueError, match="calibration"):
        resolve_tau("auto", s)
    cal_s = torch.zeros(2, 10, 10)
    cal_s[:, 3:7, 3:7] = 1.0
    cal_s[:, 2:8, 2:8] += 0.6 * (cal_s[:, 2:8, 2:8] == 0)
    cal_gt = cal_s == 1.0
    auto = resolve_tau("auto", s, taus=(0.3, 0.7), calibration=(cal_s, cal_gt))
    assert auto.value == 0.7 and auto.tau.tolist() == pytest.approx([0.7] * 3)
    assert auto.source == "tuned on calibration split (2 images)"
    assert DEFAULT_TAUS[0] == 0.05 and DEFAULT_TAUS[-1] == 0.95 and len(DEFAULT_TAUS) == 19

"""tbkd_lib.faithfulness: deletion/insertion curves on a model that looks at one pixel."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tbkd_lib.errors import ConfigError
from tbkd_lib.faithfulness import auc, deletion_curve, insertion_curve, saliency_ranks


class OnePixel(nn.Module):
    """logits = [0, 10 · x[row, col]]: p(class 1) = sigmoid(10 · pixel)."""

    def __init__(self, row=1, col=2):
        super().__init__()
        self.row, self.col = row, col

    def forward(self, images):
        v = images[:, 0, self.row, self.col]
        return torch.stack([torch.zeros_like(v), 10.0 * v], dim=1)


P_ON = 1 / (1 + math.exp(-10))   # the pixel is 1
P_OFF = 0.5                      # the pixel is 0


def test_deletion_drops_at_the_first_step_when_the_pixel_is_most_salient():
    images = torch.ones(2, 1, 4, 4)
    saliency = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    saliency[0, 1, 2] = 1.0          # image 0: the pixel the model reads is the most salient
    saliency[1, 1, 2] = -1.0         # image 1: it is the least salient
    curve = deletion_curve(OnePixel(), images, saliency, torch.tensor([1, 1]), steps=16)
    assert curve.shape == (2, 17)
    expected0 = torch.tensor([P_ON] + [P_OFF] * 16)
    expected1 = torch.tensor([P_ON] * 16 + [P_OFF])
    torch.testing.assert_close(curve[0], expected0)
    torch.testing.assert_close(curve[1], expected1)
    a = auc(curve)
    assert a[0] < a[1]
    assert a[0].item() == pytest.approx((P_ON + P_OFF) / 2 / 16 + P_OFF * 15 / 16)


def test_insertion_rises_at_the_first_step_when_the_pixel_is_most_salient():
    images = torch.ones(1, 1, 4, 4)
    saliency = torch.zeros(1, 4, 4)
    saliency[0, 1, 2] = 1.0
    curve = insertion_curve(OnePixel(), images, saliency, torch.tensor([1]), steps=4, baseline="zero")
    torch.testing.assert_close(curve[0], torch.tensor([P_OFF, P_ON, P_ON, P_ON, P_ON]))


def test_steps_change_floor_of_equal_fractions_and_blur_baseline():
    # 3 × 3 = 9 pixels, 4 steps: 0, 2, 4, 6, 9 pixels removed; the pixel is ranked 5th (index 4)
    images = torch.ones(1, 1, 3, 3)
    saliency = torch.arange(9, dtype=torch.float32).flip(0).reshape(1, 3, 3)  # raster order = rank
    model = OnePixel(row=1, col=1)                                            # raster index 4
    curve = deletion_curve(model, images, saliency, torch.tensor([1]), steps=4)
    torch.testing.assert_close(curve[0], torch.tensor([P_ON, P_ON, P_ON, P_OFF, P_OFF]))
    # a blurred all-ones image is all ones: insertion from "blur" is flat
    flat = insertion_curve(model, images, saliency, torch.tensor([1]), steps=4)
    torch.testing.assert_close(flat[0], torch.full((5,), P_ON))


def test_saliency_ranks_ties_in_raster_order():
    s = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])
    assert saliency_ranks(s).tolist() == [[1, 0, 2, 3]]


def test_auc_trapezoid_over_unit_interval():
    curve = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    assert auc(curve).tolist() == pytest.approx([0.5, 1.0])
    with pytest.raises(ValueError):
        auc(torch.ones(3))


def test_bad_arguments():
    images, sal, t = torch.ones(1, 1, 4, 4), torch.zeros(1, 4, 4), torch.tensor([1])
    with pytest.raises(ConfigError):
        deletion_curve(OnePixel(), images, sal, t, baseline="noise")
    with pytest.raises(ValueError):
        deletion_curve(OnePixel(), images, torch.zeros(1, 3, 3), t)
    with pytest.raises(ValueError):
        deletion_curve(OnePixel(), images, sal, None)


def test_prediction_under_noise_by_hand():
    from tbkd_lib.faithfulness import prediction_under_noise

    images = torch.zeros(4, 1, 3, 4)
    images[:, 0, 1, 2] = 1.0
    t = torch.ones(4, dtype=torch.long)
    p = prediction_under_noise(OnePixel(), images, t, stdevs=(0.0, 0.5), seed=3, batch_size=3)
    assert p.shape == (2,)
    assert p[0].item() == pytest.approx(P_ON, abs=1e-6)          # no noise: p = sigmoid(10)
    gen = torch.Generator().manual_seed(3)                        # the same draws, by hand
    noise = torch.cat([torch.randn((3, 1, 3, 4), generator=gen), torch.randn((1, 1, 3, 4), generator=gen)])
    expected = torch.sigmoid(10 * (1 + 0.5 * noise[:, 0, 1, 2])).mean()
    assert p[1].item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ValueError, match="stdevs"):
        prediction_under_noise(OnePixel(), images, t, stdevs=(-1,))

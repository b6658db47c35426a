"""tbkd_lib.localize: exact numbers on tiny hand-weighted models, and the plumbing guarantees."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tbkd_lib.errors import ConfigError
from tbkd_lib.localize import (METHODS, attribute, count_hooks, default_smooth_sigma, gaussian_blur,
                               gradcam_raw, hooks_released, upsample)


class TinyCam(nn.Module):
    """4×4 input → conv 2×2 stride 2 (2 channels, fixed) → GAP → linear (fixed), no bias.

    Channel 1 reads the top-left pixel of each 2×2 patch, channel 2 the bottom-right one.
    Head ``W = [[2, -1], [-1, 2]]`` (class 1 = TB = last logit).
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=2, stride=2, bias=False)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 0, 0] = 1.0
            self.conv.weight[1, 0, 1, 1] = 1.0
            self.head.weight.copy_(torch.tensor([[2.0, -1.0], [-1.0, 2.0]]))
        self.cam_layer = self.conv
        self.cam_layer_name = "conv"

    def forward(self, images):
        return self.head(self.conv(images).mean(dim=(2, 3)))


class SmallNet(nn.Module):
    """A random (seeded) conv net with nn.ReLU modules, 3 logits."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=inplace))
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(inplace=inplace))
        self.head = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.5)
        self.cam_layer = self.block
        self.cam_layer_name = "block"

    def forward(self, images):
        return self.head(self.drop(self.block(self.stem(images)).mean(dim=(2, 3))))


class LinearNet(nn.Module):
    """logits = W · flatten(x): every gradient method has a closed form."""

    def __init__(self, h=4, w=4):
        super().__init__()
        weight = torch.linspace(-1.0, 1.0, 3 * h * w).reshape(3, h * w)
        weight[2] = torch.tensor([(-1.0) ** i * (i + 1) / 10 for i in range(h * w)])
        self.register_buffer("weight", weight)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, images):
        return images.flatten(1) @ self.weight.T + self.bias


def ramp():
    return (torch.arange(16, dtype=torch.float32) / 16).reshape(1, 1, 4, 4)


# ------------------------------------------------------------------------------------- Grad-CAM
def test_gradcam_raw_matches_hand_computation():
    # alpha_k = W[c, k] / (h*w) = W[c, k] / 4; CAM = ReLU(sum_k alpha_k A_k).
    # A1 = x[0::2, 0::2] = [[0, 2], [8, 10]]/16; A2 = x[1::2, 1::2] = [[5, 7], [13, 15]]/16.
    # class 1: (-A1 + 2 A2)/4 = [[10, 12], [18, 20]]/64; class 0: ReLU((2 A1 - A2)/4) = [[0, 0], [3, 5]]/64
    model = TinyCam()
    images = torch.cat([ramp(), ramp()])
    cam = gradcam_raw(model, images, torch.tensor([1, 0]))
    assert cam.shape == (2, 2, 2) and cam.dtype == torch.float32
    torch.testing.assert_close(cam[0], torch.tensor([[10.0, 12.0], [18.0, 20.0]]) / 64)
    torch.testing.assert_close(cam[1], torch.tensor([[0.0, 0.0], [3.0, 5.0]]) / 64)


def test_gradcam_is_upsampled_bilinearly_by_default_and_nearest_on_request():
    model = TinyCam()
    bil = attribute(model, ramp(), torch.tensor([1]), "gradcam")[0] * 64
    near = attribute(model, ramp(), torch.tensor([1]), "gradcam", interpolate_mode="nearest")[0] * 64
    # nearest: constant 2×2 blocks equal to the feature-map cells
    torch.testing.assert_close(near, torch.tensor([[10.0, 10, 12, 12], [10, 10, 12, 12],
                                                   [18, 18, 20, 20], [18, 18, 20, 20]]))
    # bilinear, align_corners=False: source coordinate (i + 0.5)/2 - 0.5, clamped at the border
    assert bil[0, 0].item() == pytest.approx(10.0)
    assert bil[0, 1].item() == pytest.approx(10.5)       # .75*10 + .25*12
    assert bil[1, 1].item() == pytest.approx(12.5)       # .5625*10 + .1875*12 + .1875*18 + .0625*20
    assert bil[3, 2].item() == pytest.approx(19.5)       # .25*18 + .75*20
    r = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    torch.testing.assert_close(bil, r @ torch.tensor([[10.0, 12.0], [18.0, 20.0]]) @ r.T)
    assert default_smooth_sigma("gradcam", 224) == 0.0


def test_guided_gradcam_is_gradient_times_bilinear_cam():
    # TinyCam has no ReLU, so guided backprop = plain gradient: d logit_1 / dx is W[1,0]/4 = -1/4 on
    # (even, even) pixels, W[1,1]/4 = 1/2 on (odd, odd) pixels, 0 elsewhere. Positive part kept.
    model = TinyCam()
    out = attribute(model, ramp(), torch.tensor([1]), "guided_gradcam", smooth_sigma=0)[0] * 64
    r = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    cam = r @ torch.tensor([[10.0, 12.0], [18.0, 20.0]]) @ r.T
    expected = torch.zeros(4, 4)
    expected[1::2, 1::2] = 0.5 * cam[1::2, 1::2]
    torch.testing.assert_close(out, expected)
    assert out[1, 1].item() == pytest.approx(6.25)


def test_guided_gradcam_survives_inplace_relus():
    # Captum's guided backprop silently returns zeros with in-place ReLUs (torchvision ResNets).
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([2, 1])
    ref = attribute(SmallNet(inplace=False), images, targets, "guided_gradcam", smooth_sigma=0)
    model = SmallNet(inplace=True)
    out = attribute(model, images, targets, "guided_gradcam", smooth_sigma=0)
    assert ref.sum() > 0
    torch.testing.assert_close(out, ref)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


# ------------------------------------------------------------------------- pixel methods, exact
@pytest.fixture()
def linear_case():
    model = LinearNet()
    images = torch.cat([ramp(), 1.0 - ramp()])
    targets = torch.tensor([2, 0])
    w = model.weight[targets].reshape(2, 4, 4)
    return model, images, targets, w


def test_saliency_and_smoothgrad_equal_abs_weights(linear_case):
    model, images, targets, w = linear_case
    for method in ("saliency", "smoothgrad"):
        out = attribute(model, images, targets, method, smooth_sigma=0)
        torch.testing.assert_close(out, w.abs(), msg=method)


def test_ig_and_occlusion_equal_positive_part_of_input_times_weight(linear_case):
    # linear model, black baseline: IG = x * W (completeness, exact quadrature);
    # occlusion of one pixel (window 1, stride 1) lowers the logit by W * x.
    model, images, targets, w = linear_case
    expected = (images[:, 0] * w).clamp(min=0)
    ig = attribute(model, images, targets, "ig", smooth_sigma=0)
    occ = attribute(model, images, targets, "occlusion", window=1, stride=1)
    torch.testing.assert_close(ig, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(occ, expected, atol=1e-6, rtol=1e-5)


def test_smoothing_blurs_pixel_maps_by_default(linear_case):
    model, images, targets, w = linear_case
    raw = attribute(model, images, targets, "saliency", smooth_sigma=0)
    blurred = attribute(model, images, targets, "saliency", smooth_sigma=1.0)
    torch.testing.assert_close(blurred, gaussian_blur(raw, 1.0))
    assert not torch.allclose(raw, blurred)
    assert default_smooth_sigma("saliency", 256) == pytest.approx(4.0)


def test_gaussian_blur_keeps_constants_and_mass_in_the_interior():
    x = torch.full((1, 9, 9), 2.0)
    torch.testing.assert_close(gaussian_blur(x, 1.5), x)
    d = torch.zeros(1, 21, 21)
    d[0, 10, 10] = 1.0
    y = gaussian_blur(d, 1.0)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert y[0, 10, 10] == y.max() and y.min() >= 0
    assert gaussian_blur(d, 0) is d


# ---------------------------------------------------------------------------------- all methods
def test_every_method_returns_nonnegative_finite_float32_and_leaks_no_hooks():
    model = SmallNet()
    model.train()
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1])  # chosen so that no map is all zero for this seeded net
    assert count_hooks(model) == 0
    for method in METHODS:
        for _ in range(2):  # repeated calls must not accumulate hooks
            out = attribute(model, images, targets, method)
            assert out.shape == (2, 16, 16), method
            assert out.dtype == torch.float32, method
            assert torch.isfinite(out).all() and (out >= 0).all(), method
            assert out.flatten(1).sum(1).gt(0).all(), method
            assert count_hooks(model) == 0, method
            assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert not model.training                      # eval mode, visibly, and left that way
    assert all(p.grad is None for p in model.parameters())


def test_attribute_is_deterministic_in_eval_mode_despite_dropout():
    model = SmallNet()
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    a = attribute(model.train(), images, torch.tensor([0, 2]), "saliency")
    b = attribute(model.train(), images, torch.tensor([0, 2]), "saliency")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("targets", [None, 2, [2, 2], torch.tensor([2.0, 2.0]), torch.tensor([2]),
                                     torch.tensor([[2, 2]]), torch.tensor([-1, 0])])
def test_targets_are_explicit_and_well_shaped(targets):
    with pytest.raises(ValueError, match="targets"):
        attribute(SmallNet(), torch.rand(2, 1, 8, 8), targets, "saliency")


def test_out_of_range_target_and_bad_arguments_are_loud():
    model = SmallNet()
    with pytest.raises(ValueError, match="out of range"):
        attribute(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 3]), "saliency")
    with pytest.raises(ConfigError, match="unknown attribution method"):
        attribute(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), "lime")
    with pytest.raises(ConfigError, match="n_step"):
        attribute(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), "ig", n_step=3)
    with pytest.raises(ValueError, match="images"):
        attribute(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), "saliency")
    with pytest.raises(ConfigError, match="cam_layer"):
        attribute(LinearNet(), ramp(), torch.tensor([0]), "gradcam")
    assert count_hooks(model) == 0


def test_nan_attribution_is_an_error():
    model = LinearNet()
    model.weight[2, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"image\(s\) \[0\]"):
        attribute(model, ramp(), torch.tensor([2]), "saliency", smooth_sigma=0)


def test_hooks_released_removes_hooks_even_on_error():
    model = SmallNet()
    with pytest.raises(RuntimeError):
        with hooks_released(model):
            model.block.register_forward_hook(lambda *a: None)
            model.stem.register_full_backward_hook(lambda *a: None)
            assert count_hooks(model) == 2
            raise RuntimeError("boom")
    assert count_hooks(model) == 0


def test_upsample_shapes():
    x = torch.rand(3, 2, 2)
    assert upsample(x, (5, 7)).shape == (3, 5, 7)
    assert upsample(x[:, None], (4, 4), "nearest").shape == (3, 4, 4)


# --------------------------------------------------------------------------------------------------
# fast_path: bf16 autocast + channels-last, opt-in
def test_fast_path_matches_fp32_and_restores_the_model():
    from tbkd_lib.localize import amp_dtype_for, fast_path

    torch.manual_seed(0)
    model = SmallNet().eval()
    images = torch.rand(3, 1, 32, 32)
    targets = torch.tensor([2, 2, 1])
    ref = attribute(model, images, targets, "saliency")
    with fast_path(model, "bf16") as dtype:
        assert dtype == torch.bfloat16
        conv = next(p for p in model.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)
        fast = attribute(model, images, targets, "saliency")
    assert fast.dtype == torch.float32 and fast.shape == ref.shape  # post-processing stays fp32
    assert conv.is_contiguous()  # memory format restored
    norm = lambda s: (s - s.amin((1, 2), keepdim=True)) / (s.amax((1, 2), keepdim=True) - s.amin((1, 2), keepdim=True))
    for a, b in zip(norm(ref), norm(fast)):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.98
    with fast_path(model, "none") as dtype:
        assert dtype is None
        assert torch.equal(attribute(model, images, targets, "saliency"), ref)
    with pytest.raises(ConfigError, match="amp"):
        amp_dtype_for("fp8", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_uses_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    """Emulated bf16 (an AVX2-only CPU) was 13x slower than fp32: "auto" must mean fp32 there."""
    from tbkd_lib import hardware, localize, train

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)  # behind the one bf16 rule
    want = torch.bfloat16 if native else None
    assert localize.amp_dtype_for("auto", "cpu") is want
    assert train.amp_dtype(train.TrainConfig(amp="auto"), torch.device("cpu")) is want
    model = SmallNet()
    conv = next(p for p in model.parameters() if p.dim() == 4)
    with localize.fast_path(model, "auto") as dtype:
        assert dtype is want and torch.is_autocast_enabled("cpu") is native
        assert conv.is_contiguous(memory_format=torch.channels_last)  # channels-last either way
    assert conv.is_contiguous()
    assert localize.amp_dtype_for("bf16", "cpu") is torch.bfloat16  # asked for explicitly: always


def test_cpu_bf16_probe_agrees_with_the_cpu_flags():
    from tbkd_lib.hardware import cpu_features, cpu_has_native_bf16

    flags = cpu_features()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert cpu_has_native_bf16() == bool({"amx_bf16", "avx512_bf16"} & flags)


def test_fast_path_restores_the_model_when_the_body_raises():
    from tbkd_lib.localize import fast_path

    model = SmallNet()
    with pytest.raises(RuntimeError, match="boom"):
        with fast_path(model, "bf16"):
            raise RuntimeError("boom")
    assert all(p.is_contiguous() for p in model.parameters())
    assert not torch.is_autocast_enabled("cpu")

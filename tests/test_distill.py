"""tbkd_lib.distill: KD loss by hand, T^2 scaling, attention maps, CAM matching, distill() end to end."""
import math

import pytest
import torch

from tbkd_lib.checkpoint import load_checkpoint
from tbkd_lib.distill import (DistillConfig, attention_map, attention_transfer_loss,
                              class_activation_maps, cam_matching_loss, distill, hinton_kd_loss)
from tbkd_lib.errors import ConfigError
from tbkd_lib.io import read_jsonl
from tbkd_lib.models import build_model

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
Y = [1, 2]


def _softmax(row, temp):
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def _expected_kd(temp, alpha):
    kl = 0.0
    for s, t in zip(S, T):
        ps, pt = _softmax(s, temp), _softmax(t, temp)
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    kl /= len(S)  # batchmean
    ce = sum(-math.log(_softmax(s, 1.0)[y]) for s, y in zip(S, Y)) / len(S)
    return alpha * temp * temp * kl + (1 - alpha) * ce


@pytest.mark.parametrize("temp,alpha", [(4.0, 0.7), (1.0, 0.5), (2.0, 1.0), (3.0, 0.0)])
def test_hinton_kd_loss_by_hand(temp, alpha):
    got = hinton_kd_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), temp, alpha)
    assert got.item() == pytest.approx(_expected_kd(temp, alpha), rel=1e-6)


def test_hinton_kd_loss_hand_number():
    # T = 4, alpha = 0.7 on the fixed 2 x 3 logits above, worked out with math.exp/log
    assert hinton_kd_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y)).item() == pytest.approx(
        _expected_kd(4.0, 0.7), rel=1e-6)
    # identical logits: the KD term is zero, only (1 - alpha) * CE remains
    z = torch.tensor(S)
    ce = sum(-math.log(_softmax(s, 1.0)[y]) for s, y in zip(S, Y)) / 2
    assert hinton_kd_loss(z, z, torch.tensor(Y), 4.0, 0.7).item() == pytest.approx(0.3 * ce, rel=1e-6)


def test_t_squared_keeps_gradient_scale():
    """With T^2, d(KD)/d(student logits) tends to (s - t) / (C * B) for large T: independent of T."""
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T)
    grads = []
    for temp in (20.0, 50.0, 200.0):
        s.grad = None
        hinton_kd_loss(s, t, torch.tensor(Y), temp, alpha=1.0).backward()
        grads.append(s.grad.norm().item())
    centred = lambda z: z - z.mean(1, keepdim=True)
    limit = ((centred(s.detach()) - centred(t)) / (3 * 2)).norm().item()
    assert grads == pytest.approx([limit] * 3, rel=0.05)
    errors = [abs(g - limit) / limit for g in grads]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5e-3  # converges as O(1/T)
    # without T^2 the same gradient would shrink like 1/T^2
    s.grad = None
    (hinton_kd_loss(s, t, torch.tensor(Y), 200.0, alpha=1.0) / 200.0 ** 2).backward()
    assert s.grad.norm().item() < limit / 1000


def test_attention_map_by_hand():
    a = torch.zeros(1, 2, 2, 2)
    a[0, 0] = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    a[0, 1] = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    # mean over channels of A^2: [[1, 0], [2, 2]] -> flattened [1, 0, 2, 2] / 3
    q = attention_map(a)
    assert q.shape == (1, 4)
    assert q[0].tolist() == pytest.approx([1 / 3, 0.0, 2 / 3, 2 / 3])


def test_attention_transfer_loss():
    x = torch.rand(2, 4, 4, 4)
    assert attention_transfer_loss([x], [x * 3]).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    a = torch.zeros(1, 1, 2, 2)
    a[0, 0, 0, 0] = 1.0
    b = torch.zeros(1, 1, 2, 2)
    b[0, 0, 1, 1] = 1.0
    assert attention_transfer_loss({"l": a}, {"l": b}).item() == pytest.approx(math.sqrt(2))
    # different spatial sizes: the student's map is resized to the teacher's
    big = torch.ones(1, 3, 8, 8)
    assert attention_transfer_loss([big], [torch.ones(1, 5, 4, 4)]).item() == pytest.approx(0.0, abs=1e-6)
    # mean over layers
    assert attention_transfer_loss([a, x[:1]], [b, x[:1]]).item() == pytest.approx(math.sqrt(2) / 2)


def test_cam_by_hand_and_matching():
    fmap = torch.zeros(1, 2, 2, 2)
    fmap[0, 0] = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    fmap[0, 1] = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    weight = torch.tensor([[1.0, -1.0], [0.5, 0.5]])
    # class 0: [[1, 1], [-3, 0]] -> ReLU [[1, 1], [0, 0]], max-normalised: same
    cam = class_activation_maps(fmap, weight, torch.tensor([0]))
    assert cam[0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    # class 1: [[0.5, 1.5], [1.5, 0]] -> sum-normalised /3.5
    cam = class_activation_maps(fmap, weight, torch.tensor([1]), norm="sum")
    assert cam[0].flatten().tolist() == pytest.approx([0.5 / 3.5, 1.5 / 3.5, 1.5 / 3.5, 0.0], rel=1e-5)
    # matching: identical maps -> 0; true class 0 vs teacher 1 -> hand MSE
    assert cam_matching_loss(fmap, weight, fmap, weight, torch.tensor([0])).item() == 0.0
    t_weight = weight.flip(0)  # the teacher's class 0 is our class 1
    expect = torch.tensor([[1.0, 1.0], [0.0, 0.0]]) - torch.tensor([[0.5, 1.5], [1.5, 0.0]]) / 1.5
    got = cam_matching_loss(fmap, weight, fmap, t_weight, torch.tensor([0]))
    assert got.item() == pytest.approx(expect.pow(2).mean().item(), rel=1e-5)
    # gradients reach the student's features and head, not the teacher's
    s = fmap.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    cam_matching_loss(s, w, fmap, t_weight, torch.tensor([0]), distance="l1").backward()
    assert s.grad is not None and w.grad is not None


def test_distill_config():
    cfg = DistillConfig()
    assert (cfg.kd, cfg.temperature, cfg.alpha, cfg.cache_teacher_logits) == ("hinton", 4.0, 0.7, True)
    assert cfg.at_layers == ("backbone.layer2", "backbone.layer3", "backbone.layer4")
    with pytest.raises(ConfigError):
        DistillConfig(kd="fitnets")
    with pytest.raises(ConfigError):
        DistillConfig(alpha=1.5)
    with pytest.raises(ConfigError):
        DistillConfig(arch="resnet18", student_arch="resnet34")


class _Fake(torch.utils.data.Dataset):
    def __init__(self, n, seed=0, size=32):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.images = torch.rand(n, 1, size, size, generator=g)
        self.augment, self.epoch = True, 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if self.augment:
            img = (img + 0.01 * self.epoch).clamp(0, 1)
        return {"image": img, "label": self.labels[i], "boxes": torch.zeros(0, 4), "index": i}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from tbkd_lib.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("resnet18")
    path = tmp_path_factory.mktemp("teacher") / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_spec": model.spec, "kind": "teacher",
                           "config": {"image_size": 32}})
    return path


@pytest.mark.parametrize("kd", ["hinton", "at", "cam"])
def test_distill_end_to_end(tmp_path, teacher_ckpt, kd):
    cfg = DistillConfig(kd=kd, image_size=32, epochs=1, batch_size=8, n_boot=10, progress=False,
                        device="cpu", max_train_batches=2, student_arch="resnet18")
    data = {"train": _Fake(16), "val": _Fake(9, seed=1)}
    s = distill(cfg, data, teacher_ckpt, tmp_path / "student")
    ck = load_checkpoint(tmp_path / "student" / "last.pt")
    assert ck["kind"] == "student" and ck["config"]["kd"] == kd and ck["model_spec"]["arch"] == "resnet18"
    assert len(read_jsonl(tmp_path / "student" / "metrics.jsonl")) == 1
    assert s["teacher"] == str(teacher_ckpt) and set(s["teacher_val"]) >= {"auc_tb", "accuracy"}
    cached = tmp_path / "student" / "teacher_logits.pt"
    assert cached.exists() == (kd == "hinton")


def test_teacher_logit_cache_matches_teacher(tmp_path, teacher_ckpt):
    """The cached logits are the teacher's on the un-augmented images, in dataset order."""
    from tbkd_lib.checkpoint import load_model

    cfg = DistillConfig(image_size=32, epochs=1, batch_size=8, n_boot=0, progress=False, device="cpu",
                        max_train_batches=1, amp="none", channels_last=False)
    train = _Fake(10)
    distill(cfg, {"train": train, "val": _Fake(6, seed=1)}, teacher_ckpt, tmp_path / "s")
    cached = load_checkpoint(tmp_path / "s" / "teacher_logits.pt")["logits"]
    teacher, _ = load_model(teacher_ckpt)
    with torch.no_grad():
        expect = teacher(train.images)
    assert torch.allclose(cached, expect, atol=1e-4)
    # born-again default: the student takes the teacher's architecture
    assert load_checkpoint(tmp_path / "s" / "last.pt")["model_spec"]["arch"] == "resnet18"

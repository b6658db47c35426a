"""tbkd_lib.train: schedule, resume == uninterrupted, run-dir safety, non-finite loss, early stopping."""
import fcntl
import math

import pytest
import torch

from tbkd_lib.checkpoint import load_checkpoint
from tbkd_lib.config import load_config
from tbkd_lib.errors import ConfigError, TbkdError
from tbkd_lib.io import read_jsonl
from tbkd_lib.train import (TrainConfig, build_optimizer, build_scheduler, class_weights, evaluate,
                            fit, predict_logits)


class FakeCXR(torch.utils.data.Dataset):
    """In-memory stand-in for CXRDataset (same item dict); class c has a bright patch at row band c.

    ``augment``: noise seeded by (seed, epoch, index) only, like CXRDataset. ``nan_from_epoch``: images
    become NaN from that epoch on (to provoke a non-finite loss).
    """

    def __init__(self, n=24, size=32, seed=0, augment=False, labels=None, nan_from_epoch=None):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.as_tensor(labels) if labels is not None else torch.arange(n) % 3
        self.images = torch.rand(len(self.labels), 1, size, size, generator=g) * 0.5
        q = size // 4
        for i, c in enumerate(self.labels.tolist()):
            self.images[i, 0, q * c:q * c + q, q:2 * q] += 0.5
        self.augment, self.seed, self.epoch, self.nan_from_epoch = augment, seed, 0, nan_from_epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.augment:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
            image = (image + 0.05 * torch.randn(image.shape, generator=g)).clamp(0, 1)
        if self.nan_from_epoch is not None and self.epoch >= self.nan_from_epoch:
            image = torch.full_like(image, float("nan"))
        return {"image": image, "label": self.labels[i], "boxes": torch.zeros(0, 4), "index": i}


def tiny_config(**kw):
    base = dict(arch="mobilenet_v3_small", image_size=32, epochs=3, batch_size=8, lr=3e-3, warmup_epochs=1.0,
                n_boot=20, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def tiny_data(**kw):
    return {"train": FakeCXR(24, augment=True, **kw), "val": FakeCXR(12, seed=1)}


_TIMING = ("seconds", "train_img_per_s")


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in rows]


def test_resume_equals_uninterrupted(tmp_path, capsys):
    cfg = tiny_config()
    a = fit(cfg, tiny_data(), tmp_path / "a")
    part = fit(cfg, tiny_data(), tmp_path / "b", _stop_after_epoch=2)
    assert part["interrupted"] and load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2
    b = fit(cfg, tiny_data(), tmp_path / "b", resume=True)
    assert capsys.readouterr().out == ""  # progress=False: nothing printed
    wa = load_checkpoint(tmp_path / "a" / "last.pt")
    wb = load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert _strip(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == _strip(read_jsonl(tmp_path / "b" / "metrics.jsonl"))
    assert [r["epoch"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]
    assert a["best_val"] == b["best_val"] and a["best_epoch"] == b["best_epoch"]
    # run-dir files and the checkpoint dict
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "val_predictions.json"} <= names
    assert load_config(TrainConfig, tmp_path / "a" / "config.json") == cfg
    assert {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "config", "model_spec", "rng",
            "best_metric", "kind"} <= set(wa) and wa["kind"] == "teacher" and wa["epoch"] == 3
    row = read_jsonl(tmp_path / "a" / "metrics.jsonl")[0]
    assert {"epoch", "train_loss", "lr", "val_loss", "accuracy", "auc_tb", "sensitivity", "specificity",
            "seconds", "train_img_per_s"} <= set(row)
    assert a["epochs_run"] == 3 and "auc_tb_ci95" in a["best_val"]
    # resuming a finished run returns at once with the same result
    again = fit(cfg, tiny_data(), tmp_path / "a", resume=True)
    assert again["best_val"] == a["best_val"] and len(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == 3

    # a different configuration cannot resume the run; a non-empty dir is refused without resume
    with pytest.raises(ConfigError, match="lr"):
        fit(tiny_config(lr=1e-2), tiny_data(), tmp_path / "b", resume=True)
    with pytest.raises(TbkdError, match="already holds a run"):
        fit(cfg, tiny_data(), tmp_path / "b")


def test_second_concurrent_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TbkdError, match="another run is writing"):
            fit(tiny_config(epochs=1), tiny_data(), run)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TbkdError, match=r"non-finite training loss .* epoch 2, step 1/3"):
        fit(tiny_config(max_train_batches=None), tiny_data(nan_from_epoch=2), tmp_path / "r")
    assert load_checkpoint(tmp_path / "r" / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == [1]


def test_early_stopping_and_undefined_monitor(tmp_path):
    # the val split has no TB image: auc_tb is undefined (None) every epoch -> never improves after epoch 1
    data = {"train": FakeCXR(16), "val": FakeCXR(labels=[0, 1, 0, 1], seed=2)}
    s = fit(tiny_config(epochs=5, early_stop_patience=2, max_train_batches=1), data, tmp_path / "r")
    assert s["stopped_early"] and s["epochs_run"] == 3 and s["best_epoch"] == 1 and s["auc_tb"] is None
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [r["best"] for r in rows] == [True, False, False]


def test_cosine_schedule_with_warmup():
    model = torch.nn.Linear(2, 3)
    cfg = tiny_config(lr=1.0, min_lr=0.1, epochs=2, warmup_epochs=1.0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4)  # 8 steps, 4 of warm-up
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    expect = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs[4:] == pytest.approx(expect)
    # no weight decay on biases
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.weight_decay, 0.0]


def test_class_weights():
    w = class_weights(torch.tensor([0, 0, 0, 1, 2, 2]), 3)
    assert w.tolist() == pytest.approx([6 / 9, 6 / 3, 6 / 6])
    assert class_weights(torch.tensor([0, 1]), 3)[2] == 0


def test_evaluate_returns_arrays_for_roc(tmp_path):
    from tbkd_lib.models import build_model
    from tbkd_lib.train import _collate

    model = build_model("resnet18")
    ds = FakeCXR(10, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=_collate())
    cfg = tiny_config(n_boot=0, channels_last=False)
    out = evaluate(model, loader, cfg)
    assert out["probs"].shape == (10, 3) and out["labels"].tolist() == ds.labels.tolist()
    assert out["indices"].tolist() == list(range(10)) and not model.training
    assert out["probs"].sum(1) == pytest.approx(1.0, abs=1e-5)
    idx, logits, labels = predict_logits(model, loader, cfg)
    assert logits.shape == (10, 3) and logits.dtype == torch.float32


def test_config_validation_and_cuda_unavailable(tmp_path):
    with pytest.raises(ConfigError, match="optimizer"):
        tiny_config(optimizer="lamb")
    with pytest.raises(ConfigError, match="amp"):
        tiny_config(amp="fp8")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(TbkdError, match="CUDA is not available"):
        fit(tiny_config(device="cuda"), tiny_data(), tmp_path / "r")


def test_presets():
    from tbkd_lib.config import replace_config
    from tbkd_lib.distill import DistillConfig
    from tbkd_lib.presets import PRESETS, get_preset

    assert set(PRESETS) == {"smoke", "cpu-quick", "paper"}
    paper = get_preset("paper")
    assert (paper.teacher.arch, paper.teacher.image_size, paper.teacher.weights) == ("resnet50", 512, "IMAGENET1K_V2")
    assert isinstance(paper.student, DistillConfig) and paper.student.student_arch is None  # born-again
    smoke = get_preset("smoke")
    assert smoke.teacher.max_train_batches and smoke.teacher.epochs == 1
    assert replace_config(smoke.teacher, epochs=3).epochs == 3 and smoke.teacher.epochs == 1
    with pytest.raises(ConfigError, match="smoke, cpu-quick, paper"):
        get_preset("fast")


def test_snapshot_epochs_keep_an_early_model(tmp_path):
    from tbkd_lib.checkpoint import load_checkpoint

    cfg = tiny_config(epochs=3, snapshot_epochs=(1,))
    fit(cfg, tiny_data(), tmp_path / "r")
    snap, last = load_checkpoint(tmp_path / "r" / "epoch1.pt"), load_checkpoint(tmp_path / "r" / "last.pt")
    assert snap["epoch"] == 1 and last["epoch"] == 3
    # snapshots and best.pt carry weights and metadata, not the resume state (a third of the bytes)
    best = load_checkpoint(tmp_path / "r" / "best.pt")
    for lean in (snap, best):
        assert not {"optimizer", "lr_scheduler", "scaler", "rng"} & set(lean)
        assert {"model", "model_spec", "config", "epoch", "kind", "best_epoch"} <= set(lean)
    assert {"optimizer", "lr_scheduler", "scaler", "rng"} <= set(last)
    assert (tmp_path / "r" / "best.pt").stat().st_size < 0.6 * (tmp_path / "r" / "last.pt").stat().st_size
    assert not (tmp_path / "r" / "epoch2.pt").exists() and not (tmp_path / "r" / "epoch3.pt").exists()
    assert any(not torch.equal(snap["model"][k], last["model"][k]) for k in last["model"])
    with pytest.raises(ConfigError, match="snapshot_epochs"):
        tiny_config(snapshot_epochs=(0,))


def test_a_crash_before_the_last_checkpoint_write_of_an_epoch_resumes_exactly(tmp_path, monkeypatch):
    """A kill can land between an epoch's checkpoint writes (best.pt, epochN.pt, last.pt). Whatever the
    order, a crash just before the epoch's final write must resume to the uninterrupted run's files."""
    import io

    from tbkd_lib import train

    class Killed(BaseException):
        pass

    cfg = tiny_config(epochs=2, monitor="val_loss", snapshot_epochs=(2,))
    real = train.atomic_write_bytes
    epochs_written = []

    def recording(path, data):
        if str(path).endswith(".pt"):
            epochs_written.append(torch.load(io.BytesIO(data), weights_only=True)["epoch"])
        return real(path, data)

    monkeypatch.setattr(train, "atomic_write_bytes", recording)
    ref = fit(cfg, tiny_data(), tmp_path / "ref")
    assert epochs_written.count(2) >= 2  # epoch 2 writes at least its snapshot and last.pt
    crash_at = len(epochs_written) - 1 - epochs_written[::-1].index(2)  # epoch 2's final write
    calls = []

    def crashing(path, data):
        if str(path).endswith(".pt"):
            calls.append(path)
            if len(calls) - 1 == crash_at:
                raise Killed(path)
        return real(path, data)

    monkeypatch.setattr(train, "atomic_write_bytes", crashing)
    with pytest.raises(Killed):
        fit(cfg, tiny_data(), tmp_path / "run")
    monkeypatch.setattr(train, "atomic_write_bytes", real)
    again = fit(cfg, tiny_data(), tmp_path / "run", resume=True)
    assert again["best_epoch"] == ref["best_epoch"] and again["best_val"] == ref["best_val"]
    for name in ("best.pt", "epoch2.pt", "last.pt"):
        a, b = load_checkpoint(tmp_path / "ref" / name), load_checkpoint(tmp_path / "run" / name)
        assert (a["epoch"], a["best_epoch"]) == (b["epoch"], b["best_epoch"]), name
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name

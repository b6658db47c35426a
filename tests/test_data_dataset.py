"""tbkd_lib.data.dataset: items, box scaling, augmentation that moves boxes with the image, determinism,
the image cache."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import tbkd_lib.data.dataset as dataset_module
from tbkd_lib.data import CXRDataset, ImageCache, Record, boxes_to_size, collate, load_records
from tbkd_lib.errors import DataError

SQUARE = (64.0, 96.0, 128.0, 160.0)  # xyxy of the bright square drawn below, in a 256 x 256 image


def _square_png(path, size=256, value=255):
    array = np.full((size, size), 20, dtype=np.uint8)
    x0, y0, x1, y1 = (int(v) for v in SQUARE)
    array[y0:y1, x0:x1] = value
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def square_record(tmp_path):
    path = _square_png(tmp_path / "square.png")
    return Record(image="square.png", path=path, label="tb", boxes=(SQUARE,), categories=("ActiveTuberculosis",),
                  width=256, height=256)


def test_item_shapes_dtypes_and_exact_box_scaling(tiny_tbx11k):
    records = load_records(tiny_tbx11k, "train")
    data = CXRDataset(records, image_size=256)
    item = data[1]  # tb0003: (127, 127, 255, 255) in 512-space
    assert item["image"].shape == (1, 256, 256) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and int(item["label"]) == 2
    assert item["boxes"].dtype == torch.float32
    assert item["boxes"].tolist() == [[63.5, 63.5, 127.5, 127.5]]  # 512 -> 256 halves every coordinate
    assert item["index"] == 1 and data[0]["boxes"].shape == (0, 4)
    assert CXRDataset(records, scheme="binary").labels.tolist() == [0, 1, 0, 1]
    assert data.labels.tolist() == [0, 2, 1, 2]


def test_boxes_to_size_per_axis():
    out = boxes_to_size([(10.0, 20.0, 30.0, 40.0)], from_hw=(256, 512), to_hw=(128, 128))
    assert out.tolist() == [[2.5, 10.0, 7.5, 20.0]]
    assert boxes_to_size((), (512, 512), (224, 224)).shape == (0, 4)


def test_boxes_are_clipped_to_the_image(tmp_path):
    path = _square_png(tmp_path / "s.png")
    record = Record("s.png", path, "tb", boxes=((-1.0, -1.0, 100.0, 300.0),), width=256, height=256)
    assert CXRDataset([record], image_size=128)[0]["boxes"].tolist() == [[0.0, 0.0, 50.0, 128.0]]


def _bright_bbox(image, threshold=0.4):
    ys, xs = np.nonzero(image[0].numpy() > threshold)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_augmentation_moves_the_box_with_the_bright_square(square_record):
    data = CXRDataset([square_record] * 8, image_size=256, augment=True, seed=3)
    moved = 0
    for epoch in range(2):
        data.set_epoch(epoch)
        for i in range(len(data)):
            item = data[i]
            (box,) = item["boxes"].tolist()
            bright = _bright_bbox(item["image"])
            assert all(abs(a - b) <= 8 for a, b in zip(box, bright)), (box, bright)  # rotation widens <= ~6 px
            assert abs((box[0] + box[2]) / 2 - 96) < 30  # never mirrored (a flip would put it at x = 160)
            moved += max(abs(a - b) for a, b in zip(box, SQUARE)) > 1
    assert moved >= 12  # the augmentation does move things


def test_hflip_option_mirrors_some_items(square_record):
    data = CXRDataset([square_record] * 16, image_size=256, augment=True, hflip=True)
    centres = [(b[0] + b[2]) / 2 for b in (data[i]["boxes"][0].tolist() for i in range(16))]
    assert any(c > 140 for c in centres) and any(c < 120 for c in centres)


def test_augmentation_depends_only_on_seed_epoch_index(square_record):
    records = [square_record] * 4
    a = CXRDataset(records, image_size=64, augment=True, seed=7)
    b = CXRDataset(records, image_size=64, augment=True, seed=7)
    state = torch.get_rng_state()
    torch.manual_seed(123)  # the global RNG must not matter ...
    first = a[2]
    assert torch.equal(first["image"], b[2]["image"]) and torch.equal(first["boxes"], b[2]["boxes"])
    torch.manual_seed(123)
    a[2]
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # ... nor be touched
    torch.set_rng_state(state)
    assert not torch.equal(a[1]["image"], first["image"])  # another index, another draw
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], first["image"])  # another epoch, another draw
    a.set_epoch(0)
    assert torch.equal(a[2]["image"], first["image"])  # a resumed run sees the same augmentations
    assert not torch.equal(CXRDataset(records, image_size=64, augment=True, seed=8)[2]["image"], first["image"])


def test_same_batches_with_and_without_workers(square_record):
    data = CXRDataset([square_record] * 4, image_size=32, augment=True, seed=1)
    data.set_epoch(5)
    loaders = [torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate, num_workers=n) for n in (0, 2)]
    for b0, b2 in zip(*loaders):
        assert torch.equal(b0["images"], b2["images"]) and torch.equal(b0["indices"], b2["indices"])


def test_collate(tiny_tbx11k):
    data = CXRDataset(load_records(tiny_tbx11k, "train"), image_size=32)
    batch = collate([data[i] for i in range(4)])
    assert batch["images"].shape == (4, 1, 32, 32) and batch["labels"].tolist() == [0, 2, 1, 2]
    assert batch["indices"].tolist() == [0, 1, 2, 3] and batch["indices"].dtype == torch.int64
    assert [tuple(b.shape) for b in batch["boxes"]] == [(0, 4), (1, 4), (0, 4), (0, 4)]


def _count_reads(monkeypatch):
    calls = []
    real = dataset_module.read_image_uint8_resized

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(dataset_module, "read_image_uint8_resized", counting)
    return calls


def test_cache_hit_avoids_decoding_and_mtime_change_rereads(tmp_path, square_record, monkeypatch):
    calls = _count_reads(monkeypatch)
    cache = ImageCache()
    data = CXRDataset([square_record], image_size=64, cache=cache)
    first = data[0]["image"]
    data[0]
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1) and len(cache) == 1
    _square_png(square_record.path, value=100)  # rewrite the file, with a new mtime
    stat = os.stat(square_record.path)
    os.utime(square_record.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = data[0]["image"]
    assert len(calls) == 2 and len(cache) == 1  # re-read, old entry dropped
    assert float(second.max()) < float(first.max())


def test_persisted_cache_is_shared_by_a_new_cache(tmp_path, square_record, monkeypatch):
    calls = _count_reads(monkeypatch)
    ImageCache(tmp_path / "cache").get(square_record.path, 48)
    again = ImageCache(tmp_path / "cache").get(square_record.path, 48)
    assert len(calls) == 1 and again.shape == (48, 48) and again.dtype == np.uint8
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_dataset_errors(tiny_tbx11k):
    records = load_records(tiny_tbx11k, "train")
    path = tiny_tbx11k / "imgs" / "sick" / "s0001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="s0001.png: cannot decode image"):
        CXRDataset(records, image_size=32)[2]
    kept = CXRDataset(records, image_size=32, on_error="skip", cache=True)
    assert len(kept) == 3 and [p.split("/")[-1] for p, _ in kept.errors.skipped] == ["s0001.png"]
    assert len(kept.cache) == 3  # the check filled the cache
    with pytest.raises(DataError, match="no records to serve"):
        CXRDataset([records[2]], on_error="skip")

"""Tests of tbkd_lib.data.phantom: layout, formats, determinism, boxes, shortcut, zones, errors."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tbkd_lib.data.phantom import (FINDING_KINDS, _inside, _png_bytes, _tag_probability,
                                   generate_phantoms, render_phantom)
from tbkd_lib.errors import DataError

N_TRAIN, N_VAL = 12, 6
SPLITS = ("train", "val", "trainval")
XML_TAGS = ["annotation", "filename", "segmented", "size", "width", "height"]
OBJECT_TAGS = ["object", "name", "pose", "truncated", "difficult", "bndbox", "xmin", "ymin", "xmax", "ymax"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms") / "set"
    summary = generate_phantoms(out, N_TRAIN, N_VAL, seed=3)
    assert summary["n_images"] == N_TRAIN + N_VAL
    return out


@pytest.fixture(scope="module")
def truth(phantoms) -> dict:
    return json.loads((phantoms / "truth.json").read_text())


def _lines(root: Path, name: str) -> list[str]:
    raw = (root / "lists" / f"{name}.txt").read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    return raw.decode().splitlines()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ layout
def test_layout_files_exist(phantoms, truth):
    for split in SPLITS:
        for name in (f"TBX11K_{split}", f"all_{split}"):
            assert (phantoms / "lists" / f"{name}.txt").is_file()
            assert (phantoms / "annotations" / "json" / f"{name}.json").is_file()
        assert (phantoms / "annotations" / "json" / f"TBX11K_{split}_only_tb.json").is_file()
    pngs = sorted(p.relative_to(phantoms).as_posix() for p in (phantoms / "imgs").rglob("*.png"))
    assert pngs == sorted(truth["images"])
    assert len(pngs) == N_TRAIN + N_VAL
    tb = [p for p in pngs if p.startswith("imgs/tb/")]
    xmls = sorted(p.name for p in (phantoms / "annotations" / "xml").glob("*.xml"))
    assert xmls == sorted(Path(p).stem + ".xml" for p in tb)
    assert not list(phantoms.parent.glob(".set.*")), "temporary folders must be gone"


def test_numbering_is_one_based_and_continuous_over_splits(truth):
    for folder, prefix in (("health", "h"), ("sick", "s"), ("tb", "tb")):
        names = [k for k in truth["images"] if k.startswith(f"imgs/{folder}/")]
        numbers = sorted(int(Path(k).stem[len(prefix):]) for k in names)
        assert numbers == list(range(1, len(names) + 1))
        assert all(len(Path(k).stem) == len(prefix) + 4 for k in names)
        splits = [truth["images"][f"imgs/{folder}/{prefix}{i:04d}.png"]["split"] for i in numbers]
        assert splits == sorted(splits, key=["train", "val"].index)          # train first, then val


def test_class_counts_follow_proportions(truth):
    labels = [(e["split"], e["label"]) for e in truth["images"].values()]
    assert labels.count(("train", "healthy")) == 5       # 12 * 0.4 = 4.8 -> largest remainders
    assert labels.count(("train", "sick")) == 4
    assert labels.count(("train", "tb")) == 3
    assert sum(1 for s, _ in labels if s == "val") == N_VAL


def test_pngs_are_rgb_with_equal_channels(phantoms):
    for path in (phantoms / "imgs").rglob("*.png"):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (512, 512)
            a = np.asarray(im)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
        assert 20 < a.std() and a.min() < 40 and a.max() > 150          # a film, not a flat image


def test_png_writer_round_trips_exactly():
    gray = np.random.default_rng(0).integers(0, 256, (37, 53), dtype=np.uint8)
    import io
    with Image.open(io.BytesIO(_png_bytes(gray))) as im:
        a = np.asarray(im)
    assert a.shape == (37, 53, 3) and (a == gray[..., None]).all()


# --------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_bytes_and_other_seed_differs(phantoms, tmp_path):
    again = tmp_path / "again"
    generate_phantoms(again, N_TRAIN, N_VAL, seed=3)
    first, second = _files(phantoms), _files(again)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    other = tmp_path / "other"
    generate_phantoms(other, N_TRAIN, N_VAL, seed=4)
    third = _files(other)
    pngs = [k for k in first if k.endswith(".png")]
    assert all(first[k] != third[k] for k in pngs)


def test_images_do_not_depend_on_set_size(phantoms, tmp_path):
    bigger = tmp_path / "bigger"
    generate_phantoms(bigger, 2 * N_TRAIN, 1, seed=3)
    for name in ("health/h0001.png", "sick/s0002.png", "tb/tb0003.png"):
        assert (bigger / "imgs" / name).read_bytes() == (phantoms / "imgs" / name).read_bytes()


def test_anatomy_does_not_depend_on_the_tag():
    seq = np.random.SeedSequence(11)
    with_tag, truth = render_phantom(np.random.default_rng(seq), "tb", True)
    without, truth_without = render_phantom(np.random.default_rng(seq), "tb", False)
    x1, y1, x2, y2 = (int(v) for v in truth["shortcut"]["box"])
    differ = np.argwhere(with_tag != without)
    assert len(differ) > 0
    assert differ[:, 0].min() >= y1 - 4 and differ[:, 0].max() <= y2 + 4      # only the tag (+ blur)
    assert differ[:, 1].min() >= x1 - 4 and differ[:, 1].max() <= x2 + 4
    assert truth["boxes"] == truth_without["boxes"]


# ------------------------------------------------------------------------------- annotations
def test_xml_structure_and_round_trip(phantoms, truth):
    for key, entry in truth["images"].items():
        if entry["label"] != "tb":
            continue
        stem = Path(key).stem
        path = phantoms / "annotations" / "xml" / f"{stem}.xml"
        text = path.read_text()
        assert text.startswith("<annotation>\n\t<filename>") and text.endswith("</annotation>\n")
        root = ET.fromstring(text)
        tags = [e.tag for e in root.iter()]
        n = len(entry["boxes"])
        assert tags == XML_TAGS + OBJECT_TAGS * n
        assert root.findtext("filename") == stem and root.findtext("segmented") == "0"
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        assert 1352 <= width <= 3056 and 1656 <= height <= 3072
        for obj, box, name in zip(root.findall("object"), entry["boxes"], entry["categories"]):
            assert obj.findtext("name") == name
            assert (obj.findtext("pose"), obj.findtext("truncated"), obj.findtext("difficult")) == \
                ("unspecified", "0", "0")
            raw = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            back = [raw[0] * 512 / width - 1, raw[1] * 512 / height - 1,
                    raw[2] * 512 / width - 1, raw[3] * 512 / height - 1]
            assert np.allclose(back, box, atol=0.25)


def test_coco_json_matches_truth(phantoms, truth):
    for split in SPLITS:
        lines = _lines(phantoms, f"TBX11K_{split}")
        for suffix, only_tb in (("", False), ("_only_tb", True)):
            coco = json.loads((phantoms / "annotations" / "json" / f"TBX11K_{split}{suffix}.json").read_text())
            assert isinstance(coco["info"], list) and len(coco["info"]) == 1
            assert [(c["id"], c["name"], c["supercategory"]) for c in coco["categories"]] == [
                (1, "ActiveTuberculosis", "Tuberculosis"), (2, "ObsoletePulmonaryTuberculosis", "Tuberculosis"),
                (3, "PulmonaryTuberculosis", "Tuberculosis")]
            expected = [ln for ln in lines if not only_tb or ln.startswith("tb/")]
            assert [im["file_name"] for im in coco["images"]] == expected
            assert [im["id"] for im in coco["images"]] == list(range(1, len(expected) + 1))
            assert all(im["width"] == im["height"] == 512 for im in coco["images"])
            by_id = {im["id"]: im["file_name"] for im in coco["images"]}
            got: dict[str, list] = {}
            for k, ann in enumerate(coco["annotations"], start=1):
                assert ann["id"] == k and ann["iscrowd"] == 0 and "segmentation" not in ann
                x, y, w, h = ann["bbox"]
                assert ann["area"] == int(w * h)
                got.setdefault(by_id[ann["image_id"]], []).append(([x, y, x + w, y + h], ann["category_id"]))
            for line in expected:
                entry = truth["images"][f"imgs/{line}"]
                pairs = got.get(line, [])
                assert len(pairs) == len(entry["boxes"])
                for (box, cat), want, name in zip(pairs, entry["boxes"], entry["categories"]):
                    assert np.allclose(box, want, atol=0.011)
                    assert cat == 1 + ["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"].index(name)


def test_lists_cover_all_images(phantoms, truth):
    train, val, trainval = (_lines(phantoms, f"TBX11K_{s}") for s in SPLITS)
    assert not set(train) & set(val)
    assert trainval == train + val
    assert {f"imgs/{ln}" for ln in trainval} == set(truth["images"])
    assert all(truth["images"][f"imgs/{ln}"]["split"] == "train" for ln in train)
    for split in SPLITS:
        assert _lines(phantoms, f"all_{split}") == _lines(phantoms, f"TBX11K_{split}")
    labels = [truth["images"][f"imgs/{ln}"]["label"] for ln in train]
    assert labels != sorted(labels), "lists are shuffled"


def test_loader_reads_the_phantoms(phantoms, truth):
    data = pytest.importorskip("tbkd_lib.data")
    records = data.load_records(phantoms, split="trainval")
    assert len(records) == N_TRAIN + N_VAL
    for rec in records:
        entry = truth["images"][rec.image]
        assert rec.label == entry["label"]
        assert list(rec.categories) == entry["categories"]
        assert np.allclose(np.reshape(rec.boxes, (-1, 4)), np.reshape(entry["boxes"], (-1, 4)), atol=0.25)


# ------------------------------------------------------------------------------ class content
def test_tb_boxes_lie_in_the_lungs_and_others_have_none(truth):
    for entry in truth["images"].values():
        lungs = [np.array(p) for p in entry["lung_masks"].values()]
        if entry["label"] != "tb":
            assert entry["boxes"] == [] and entry["categories"] == [] and entry["findings"] == []
            assert (entry["distractors"] != []) == (entry["label"] == "sick")
            continue
        assert 1 <= len(entry["boxes"]) <= 3 and entry["distractors"] == []
        assert len(entry["findings"]) == len(entry["categories"]) == len(entry["boxes"])
        assert set(entry["findings"]) <= set(FINDING_KINDS)
        for x1, y1, x2, y2 in entry["boxes"]:
            assert 0 <= x1 < x2 <= 511 and 0 <= y1 < y2 <= 511
            centre = [((x1 + x2) / 2, (y1 + y2) / 2)]
            assert any(_inside(poly, centre)[0] for poly in lungs)


def test_lung_masks_match_the_dark_lung_fields():
    from PIL import ImageDraw, ImageFilter
    for i in range(4):
        image, truth = render_phantom(np.random.default_rng([8, i]), "healthy", False)
        canvas = Image.new("L", (512, 512))
        for poly in truth["lung_masks"].values():
            ImageDraw.Draw(canvas).polygon([tuple(p) for p in poly], fill=255)
        inside = np.asarray(canvas.filter(ImageFilter.MinFilter(9))) > 0          # eroded lungs
        ring = (np.asarray(canvas.filter(ImageFilter.MaxFilter(25))) > 0) & ~(np.asarray(canvas) > 0)
        assert image[inside].mean() + 40 < image[ring].mean()                   # dark fields, bright rim


def test_findings_mostly_in_upper_and_middle_zones():
    upper, total, widths = 0, 0, []
    for i in range(50):
        _, truth = render_phantom(np.random.default_rng([5, i]), "tb", False)
        lungs = np.concatenate([np.array(p) for p in truth["lung_masks"].values()])
        top, bottom = lungs[:, 1].min(), lungs[:, 1].max()
        for x1, y1, x2, y2 in truth["boxes"]:
            total += 1
            upper += (y1 + y2) / 2 < top + 2 / 3 * (bottom - top)
            widths.append(x2 - x1)
    assert upper >= 0.7 * total
    assert 20 <= min(widths) and max(widths) <= 220 and 60 <= np.median(widths) <= 130


def test_latent_tb_is_a_minority():
    cats = [c for i in range(40) for c in render_phantom(np.random.default_rng([6, i]), "tb", False)[1]["categories"]]
    share = cats.count("ObsoletePulmonaryTuberculosis") / len(cats)
    assert 0.05 <= share <= 0.4 and set(cats) <= {"ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"}


# ---------------------------------------------------------------------------------- shortcut
def test_shortcut_absent_by_default(truth):
    assert truth["shortcut"] == 0.0
    assert not any(e["shortcut"]["present"] for e in truth["images"].values())


def test_tag_probability_rule():
    assert _tag_probability("train", "tb", 0.0) == 0.0 == _tag_probability("val", "sick", 0.0)
    assert _tag_probability("train", "tb", 0.6) == pytest.approx(0.8)
    assert _tag_probability("train", "healthy", 0.6) == pytest.approx(0.2)
    assert _tag_probability("val", "tb", 0.6) == _tag_probability("val", "sick", 0.6) == 0.5


def test_perfect_shortcut_in_train_and_independent_in_val(tmp_path):
    out = tmp_path / "shortcut"
    generate_phantoms(out, 60, 40, seed=0, shortcut=1.0, image_size=128)
    truth = json.loads((out / "truth.json").read_text())
    train = [e for e in truth["images"].values() if e["split"] == "train"]
    val = [e for e in truth["images"].values() if e["split"] == "val"]
    assert all(e["shortcut"]["present"] == (e["label"] == "tb") for e in train)
    present = [e["shortcut"]["present"] for e in val]
    assert 0.2 <= np.mean(present) <= 0.8
    assert {(e["label"] == "tb", e["shortcut"]["present"]) for e in val} == {(True, True), (True, False),
                                                                           (False, True), (False, False)}
    for key, e in truth["images"].items():
        tag = e["shortcut"]
        assert tag["kind"] == "corner_tag" and (tag["box"] is not None) == tag["present"]
        if tag["present"]:
            x1, y1, x2, y2 = tag["box"]
            assert x2 < 64 and y2 < 64 and x2 - x1 == y2 - y1 == 7      # 24 px at 512; at least 8 px
            with Image.open(out / key) as im:
                a = np.asarray(im)[..., 0]
            assert a.shape == (128, 128)
            assert a[int(y1):int(y2) + 1, int(x1):int(x2) + 1].mean() > 120   # a bright tag


# ------------------------------------------------------------------------------------ errors
def test_refuses_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine"):
        generate_phantoms(foreign, 2, 1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_replaces_a_previous_phantom_set(tmp_path):
    out = tmp_path / "set"
    generate_phantoms(out, 6, 3, seed=0, image_size=64)
    generate_phantoms(out, 3, 1, seed=1, image_size=64)
    truth = json.loads((out / "truth.json").read_text())
    assert truth["seed"] == 1 and len(truth["images"]) == 4
    assert len(list((out / "imgs").rglob("*.png"))) == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"n_train": 0, "n_val": 1}, "n_train"),
    ({"n_train": 1, "n_val": 0}, "n_val"),
    ({"n_train": 2, "n_val": 1, "shortcut": 1.5}, "shortcut"),
    ({"n_train": 2, "n_val": 1, "proportions": (1, 1)}, "proportions"),
    ({"n_train": 2, "n_val": 1, "seed": -1}, "seed"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_phantoms(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_a_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    import tbkd_lib.data.phantom as phantom

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return render_phantom(*args, **kwargs)

    monkeypatch.setattr(phantom, "render_phantom", failing)
    with pytest.raises(RuntimeError, match="boom"):
        generate_phantoms(tmp_path / "set", 4, 2, image_size=64)
    assert list(tmp_path.iterdir()) == []

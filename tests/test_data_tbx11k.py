"""tbkd_lib.data.tbx11k: lists, labels, XML boxes, COCO cross-check, the official-layout loader."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from tbkd_lib.data import load_records, parse_xml, read_coco, read_list, scale_box
from tbkd_lib.data.tbx11k import label_for_line
from tbkd_lib.errors import DataError


# ------------------------------------------------------------------------------------- XML + scale
def test_parse_xml_and_scale_by_hand(tmp_path, helpers):
    path = tmp_path / "tb0003.xml"
    path.write_text(helpers.voc_xml("tb0003", 2000, 2500, [("ActiveTuberculosis", 500, 625, 1000, 1250)]))
    boxes, names, size = parse_xml(path)
    assert boxes == [(500, 625, 1000, 1250)] and names == ["ActiveTuberculosis"] and size == (2000, 2500)
    # 500*512/2000-1, 625*512/2500-1, 1000*512/2000-1, 1250*512/2500-1
    assert scale_box(boxes[0], size) == (127.0, 127.0, 255.0, 255.0)
    # 256-px stored image: 500*256/2000-1, 625*256/2500-1, 1000*256/2000-1, 1250*256/2500-1
    assert scale_box(boxes[0], size, (256, 256)) == (63.0, 63.0, 127.0, 127.0)


def test_xml_without_object_has_zero_boxes(tmp_path, helpers):
    path = tmp_path / "tb1199.xml"
    path.write_text(helpers.voc_xml("tb1199", 2017, 2008))
    assert parse_xml(path) == ([], [], (2017, 2008))


@pytest.mark.parametrize("text, expected", [
    ("<annotation><size>", "malformed XML"),
    ("<annotation><object/></annotation>", "<size>"),
    ("<annotation><size><width>10</width></size></annotation>", "size/height"),
    (None, "xmax"),  # xmax <= xmin
    ("OUTSIDE", "outside the original image"),
    ("FLOAT", "expected an integer"),
    ("NAME", "expected one of"),
    ("NOBOX", "bndbox"),
])
def test_bad_xml_names_file_and_tag(tmp_path, helpers, text, expected):
    path = tmp_path / "tb0007.xml"
    if text is None:
        text = helpers.voc_xml("tb0007", 100, 100, [("ActiveTuberculosis", 50, 10, 50, 20)])
    elif text == "OUTSIDE":
        text = helpers.voc_xml("tb0007", 100, 100, [("ActiveTuberculosis", 10, 10, 101, 20)])
    elif text == "FLOAT":
        text = helpers.voc_xml("tb0007", 100, 100, [("ActiveTuberculosis", "10.5", 10, 30, 20)])
    elif text == "NAME":
        text = helpers.voc_xml("tb0007", 100, 100, [("Tuberculosis", 10, 10, 30, 20)])
    elif text == "NOBOX":
        text = ("<annotation><size><width>9</width><height>9</height></size>"
                "<object><name>ActiveTuberculosis</name></object></annotation>")
    path.write_text(text)
    with pytest.raises(DataError) as info:
        parse_xml(path)
    assert "tb0007.xml" in str(info.value) and expected in str(info.value)


# ------------------------------------------------------------------------------------ lists, labels
@pytest.mark.parametrize("line, label, source", [
    ("health/h0004.png", "healthy", "tbx11k"), ("sick/s0001.png", "sick", "tbx11k"),
    ("tb/tb0003.png", "tb", "tbx11k"),
    ("extra/mc+shenzhen/train/CHNCXR_0331_1.png", "tb", "extra"),
    ("extra/mc+shenzhen/val/MCUCXR_0001_0.png", "healthy", "extra"),
    ("extra/da+db/train/p001.png", "tb", "extra"), ("extra/da+db/val/nx12.jpg", "healthy", "extra"),
    ("extra/da+db/val/px12.jpg", "tb", "extra"),
])
def test_label_for_line(line, label, source):
    assert label_for_line(line) == (label, source)


@pytest.mark.parametrize("line, expected", [
    ("test/unknown_1.png", "not public"), ("xray/a.png", "unknown folder"),
    ("extra/other/a_1.png", "unknown extra subset"), ("extra/mc+shenzhen/train/X.png", "_1"),
    ("../tb/tb0003.png", "relative path"),
])
def test_label_for_line_refuses(line, expected):
    with pytest.raises(ValueError, match=expected):
        label_for_line(line)


def test_read_list(tmp_path):
    path = tmp_path / "l.txt"
    path.write_bytes(b"tb/tb0003.png\r\n\r\nhealth/h0001.png\r\n")
    assert read_list(path) == ["tb/tb0003.png", "health/h0001.png"]
    path.write_text("\n \n")
    with pytest.raises(DataError, match="l.txt: empty list file"):
        read_list(path)
    with pytest.raises(DataError, match="nope.txt: list file not found"):
        read_list(tmp_path / "nope.txt")


# --------------------------------------------------------------------------------- tiny layout
def test_tiny_layout_records(tiny_tbx11k):
    train = load_records(tiny_tbx11k, "train")
    assert [r.image for r in train] == ["imgs/health/h0001.png", "imgs/tb/tb0003.png", "imgs/sick/s0001.png",
                                        "imgs/tb/tb1199.png"]
    assert [r.label for r in train] == ["healthy", "tb", "sick", "tb"]
    h, tb3, s, tb1199 = train
    assert tb3.boxes == ((127.0, 127.0, 255.0, 255.0),) and tb3.categories == ("ActiveTuberculosis",)
    assert tb3.path == tiny_tbx11k.resolve() / "imgs" / "tb" / "tb0003.png"
    assert (tb3.width, tb3.height, tb3.source) == (512, 512, "tbx11k")
    assert h.boxes == () and s.boxes == () and tb1199.boxes == () and tb1199.label == "tb"
    assert train.errors.skipped == []


def test_tiny_layout_scales_to_the_actual_stored_size(tiny_tbx11k):
    (rec,) = load_records(tiny_tbx11k, "val")
    assert (rec.width, rec.height) == (256, 256)
    # 100*256/1000-1, 200*256/1000-1, 300*256/1000-1, 400*256/1000-1
    assert rec.boxes[0] == pytest.approx((24.6, 50.2, 75.8, 101.4), abs=1e-9)
    assert rec.categories == ("ObsoletePulmonaryTuberculosis",)
    assert len(load_records(tiny_tbx11k, "trainval")) == 5


def test_tiny_layout_extras(tiny_tbx11k):
    records = load_records(tiny_tbx11k, "all_train")
    extras = [(r.image.split("/")[-1], r.label, r.source, r.boxes) for r in records if r.source == "extra"]
    assert extras == [("CHNCXR_0001_1.png", "tb", "extra", ()), ("MCUCXR_0002_0.png", "healthy", "extra", ()),
                      ("p001.png", "tb", "extra", ()), ("n002.png", "healthy", "extra", ())]


def test_coco_json_is_read_with_info_as_list(tiny_tbx11k):
    coco = read_coco(tiny_tbx11k / "annotations" / "json" / "TBX11K_train.json")
    assert coco["tb/tb0003.png"].boxes == [(127.0, 127.0, 255.0, 255.0)]
    assert coco["tb/tb0003.png"].names == ["ActiveTuberculosis"]
    assert coco["health/h0001.png"].boxes == []


def test_coco_disagreement_names_both_files(tiny_tbx11k, helpers):
    path = tiny_tbx11k / "annotations" / "json" / "TBX11K_train.json"
    coco = helpers.coco_json(helpers.TINY_TRAIN, {"tb/tb0003.png": [(1, [130.0, 127.0, 125.0, 128.0])]})
    path.write_text(json.dumps(coco))  # xmin 3 px off
    with pytest.raises(DataError) as info:
        load_records(tiny_tbx11k, "train")
    assert "tb0003.xml" in str(info.value) and "TBX11K_train.json" in str(info.value)
    within = helpers.coco_json(helpers.TINY_TRAIN, {"tb/tb0003.png": [(1, [128.0, 126.0, 128.0, 129.0])]})
    path.write_text(json.dumps(within))  # off by 1 px: within the 1.5 px tolerance
    assert load_records(tiny_tbx11k, "train")[1].boxes == ((127.0, 127.0, 255.0, 255.0),)


def test_coco_extra_box_on_a_healthy_image_is_a_disagreement(tiny_tbx11k, helpers):
    path = tiny_tbx11k / "annotations" / "json" / "TBX11K_train.json"
    coco = helpers.coco_json(helpers.TINY_TRAIN, {"tb/tb0003.png": [(1, [127.0, 127.0, 128.0, 128.0])],
                                                  "health/h0001.png": [(1, [10.0, 10.0, 20.0, 20.0])]})
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"h0001.png disagrees with .*TBX11K_train.json: 0 box\(es\) vs 1"):
        load_records(tiny_tbx11k, "train")


def test_test_split_is_refused(tiny_tbx11k):
    with pytest.raises(DataError, match="not public"):
        load_records(tiny_tbx11k, "all_test")
    (tiny_tbx11k / "lists" / "TBX11K_val.txt").write_text("test/unknown_1.png\n")
    with pytest.raises(DataError, match=r"TBX11K_val.txt: line 1: 'test/unknown_1.png': .*not public"):
        load_records(tiny_tbx11k, "val")


# ------------------------------------------------------------------------------------ real sample
def _independent_boxes(xml_path):
    root = ET.parse(xml_path).getroot()
    width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
    out = []
    for obj in root.iter("object"):
        x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        out.append((x0 / width * 512 - 1, y0 / height * 512 - 1, x1 / width * 512 - 1, y1 / height * 512 - 1))
    return out


@pytest.mark.real_data
def test_real_sample_trainval(tbx11k_sample):
    records = load_records(tbx11k_sample, "trainval")
    assert len(records) == 30 and {r.label for r in records} == {"tb"}
    by_name = {r.image.split("/")[-1]: r for r in records}
    assert by_name["tb1199.png"].boxes == ()
    assert sum(len(r.boxes) for r in records) == 43
    for r in records:
        assert (r.width, r.height) == (512, 512)
        expected = _independent_boxes(tbx11k_sample / "annotations" / "xml" / (r.path.stem + ".xml"))
        assert len(r.boxes) == len(expected)
        for got, want in zip(r.boxes, expected):
            assert got == pytest.approx(want, abs=1e-9)


@pytest.mark.real_data
@pytest.mark.parametrize("split, count", [("train", 24), ("val", 6)])
def test_real_sample_splits_in_list_order(tbx11k_sample, split, count):
    records = load_records(tbx11k_sample, split)
    lines = (tbx11k_sample / "lists" / f"TBX11K_{split}.txt").read_text().split()
    assert len(records) == count and [r.image for r in records] == [f"imgs/{line}" for line in lines]

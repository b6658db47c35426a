"""Case 4 — one data set with every kind of bad file, real bytes on disk.

Official layout (``imgs/`` + ``lists/`` + ``annotations/xml``), 64 px PNGs. What the loader does:

=============  ======================================  =============================================
file           fault                                   expected
=============  ======================================  =============================================
h0002.png      truncated PNG (header intact)           decode time: DataError / skipped by CXRDataset
h0003.png      zero bytes                              load time: DataError / skipped by load_records
tb0002.xml     <ymax> missing                          load time
tb0003.xml     xmax beyond <size><width>               load time
h0004.dcm      DICOM without pixel data                decode time
tb0004.png     300 x 200 (not 512 x 512)               ACCEPTED: boxes scaled per axis to 300 x 200
s0002.png      16-bit PNG                              ACCEPTED: read as value / 65535, not skipped
h0005.png      JPEG bytes named .png                   ACCEPTED: PIL sniffs the content
data.csv       (Kaggle layout) malformed bbox          load time: names the CSV, line and field
=============  ======================================  =============================================

Strict mode names the offending file, one fault at a time; skip mode finishes and reports EXACTLY which
files were dropped and why. Header-only loading (the default) cannot see truncation or missing pixels:
those are decode-time faults, caught by ``CXRDataset(..., on_error="skip")`` or ``decode=True``.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tbkd_lib.data import CXRDataset, load_records, read_image
from tbkd_lib.errors import DataError

GOOD = ["health/h0001.png", "sick/s0001.png", "tb/tb0001.png"]
GOOD_BOX = ("ActiveTuberculosis", 500, 625, 1000, 1250)  # in a 2000 x 2500 original


def _png(path, array=None, size=(64, 64), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.random.default_rng(abs(hash(path.name)) % 2**32).integers(0, 256, (size[1], size[0]), np.uint8)
    Image.fromarray(array).save(path, format=fmt)
    return path


def _xml(root, stem, text):
    path = root / "annotations" / "xml" / f"{stem}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# Each fault: list line, writer(root, helpers, make_dicom) -> the file that must be named, stage, reason.
def _truncated(root, h, mk):
    path = _png(root / "imgs" / "health" / "h0002.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def _zero_byte(root, h, mk):
    path = root / "imgs" / "health" / "h0003.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _missing_tag(root, h, mk):
    _png(root / "imgs" / "tb" / "tb0002.png")
    text = h.voc_xml("tb0002", 2000, 2500, [GOOD_BOX]).replace("\t\t\t<ymax>1250</ymax>\n", "")
    return _xml(root, "tb0002", text)


def _box_outside(root, h, mk):
    _png(root / "imgs" / "tb" / "tb0003.png")
    return _xml(root, "tb0003", h.voc_xml("tb0003", 2000, 2500, [("ActiveTuberculosis", 500, 625, 2400, 1250)]))


def _no_pixels(root, h, mk):
    return mk(root / "imgs" / "health" / "h0004.dcm", np.zeros((64, 64)), with_pixels=False)


FAULTS = {  # name: (list line, writer, stage, reason in the message)
    "truncated": ("health/h0002.png", _truncated, "decode", "cannot decode image"),
    "zero_byte": ("health/h0003.png", _zero_byte, "load", "empty file (0 bytes)"),
    "missing_tag": ("tb/tb0002.png", _missing_tag, "load", "missing tag <object[0]/bndbox/ymax>"),
    "box_outside": ("tb/tb0003.png", _box_outside, "load", "is outside the original image"),
    "no_pixels": ("health/h0004.dcm", _no_pixels, "decode", "no pixel data element"),
}
PNG16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 14 + 5000).astype(np.uint16)  # 5000..62338


def _accepted(root, h):
    """The odd-but-valid files: wrong size, 16-bit, JPEG named .png."""
    _png(root / "imgs" / "tb" / "tb0004.png", size=(300, 200))
    _xml(root, "tb0004", h.voc_xml("tb0004", 3000, 2000, [("ActiveTuberculosis", 600, 400, 1500, 1000)]))
    _png(root / "imgs" / "sick" / "s0002.png", PNG16)
    _png(root / "imgs" / "health" / "h0005.png", np.full((64, 64), 128, np.uint8), fmt="JPEG")
    return ["tb/tb0004.png", "sick/s0002.png", "health/h0005.png"]


def build_official(root, helpers, make_dicom, faults=(), accepted=False):
    """The official layout with the GOOD images, ``faults`` (names of FAULTS) and, optionally, the
    accepted odd files. Returns ``{fault: file that must be named}``."""
    for line in GOOD:
        _png(root / "imgs" / line)
    _xml(root, "tb0001", helpers.voc_xml("tb0001", 2000, 2500, [GOOD_BOX]))
    lines, named = list(GOOD), {}
    for name in faults:
        line, writer, _, _ = FAULTS[name]
        named[name] = writer(root, helpers, make_dicom)
        lines.append(line)
    if accepted:
        lines += _accepted(root, helpers)
    (root / "lists").mkdir(parents=True, exist_ok=True)
    (root / "lists" / "TBX11K_train.txt").write_text("\n".join(lines) + "\n")
    return named


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_strict_mode_names_the_offending_file(fault, tmp_path, helpers, make_dicom):
    root = tmp_path.resolve() / "TBX11K"
    path = build_official(root, helpers, make_dicom, [fault])[fault]
    _, _, stage, reason = FAULTS[fault]
    if stage == "load":
        with pytest.raises(DataError) as info:
            load_records(root, "train")
    else:  # header-only loading passes; decoding the pixels names the file
        records = load_records(root, "train")
        index = [r.path for r in records].index(path)
        with pytest.raises(DataError) as info:
            CXRDataset(records, image_size=32)[index]
        assert info.value.path == str(path) and reason in str(info.value)
        with pytest.raises(DataError) as info:
            load_records(root, "train", decode=True)
    assert info.value.path == str(path), str(info.value)
    assert str(path) in str(info.value) and reason in str(info.value)


def test_skip_mode_reports_exactly_what_was_dropped(tmp_path, helpers, make_dicom):
    root = tmp_path.resolve() / "TBX11K"
    named = build_official(root, helpers, make_dicom, sorted(FAULTS), accepted=True)
    n_listed = len(GOOD) + len(FAULTS) + 3
    expect = {stage: {str(named[f]): reason for f, (_, _, s, reason) in FAULTS.items() if s == stage}
              for stage in ("load", "decode")}

    records = load_records(root, "train", on_error="skip")  # header-only: load-time faults
    assert {p for p, _ in records.errors.skipped} == set(expect["load"])
    assert len(records.errors.skipped) == 3 and len(records) == n_listed - 3
    for path, why in records.errors.skipped:
        assert expect["load"][path] in why, (path, why)
    assert records.errors.summary().startswith("skipped 3 file(s):")

    ds = CXRDataset(records, image_size=32, on_error="skip")  # decode-time faults
    assert {p for p, _ in ds.errors.skipped} == set(expect["decode"]) and len(ds.errors.skipped) == 2
    for path, why in ds.errors.skipped:
        assert expect["decode"][path] in why, (path, why)
    assert len(ds) == n_listed - 5
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1

    decoded = load_records(root, "train", on_error="skip", decode=True)  # both at once
    assert {p for p, _ in decoded.errors.skipped} == set(expect["load"]) | set(expect["decode"])
    assert len(decoded.errors.skipped) == 5 and len(decoded) == n_listed - 5


def test_skip_mode_through_the_cli(rel, tmp_path, helpers, make_dicom, capsys):
    root = tmp_path.resolve() / "TBX11K"
    named = build_official(root, helpers, make_dicom, sorted(FAULTS), accepted=True)
    rc, _, err = rel.main(capsys, "inspect", root, "--split", "train")
    first = next(f for f in sorted(FAULTS) if FAULTS[f][2] == "load")  # list order = sorted(FAULTS)
    assert rc == 2 and err.startswith(f"tbkd: error: {named[first]}: ") and len(err.splitlines()) == 1, err
    rc, out, err = rel.main(capsys, "inspect", root, "--split", "train", "--on-error", "skip")
    assert rc == 0, err
    assert "skipped 3 file(s):" in out and "images=8 " in out
    for fault in ("zero_byte", "missing_tag", "box_outside"):
        assert f"  {named[fault]}: " in out


def test_odd_but_valid_files_are_read_correctly(tmp_path, helpers, make_dicom):
    root = tmp_path.resolve() / "TBX11K"
    build_official(root, helpers, make_dicom, accepted=True)
    records = {r.image: r for r in load_records(root, "train", decode=True)}
    assert len(records) == len(GOOD) + 3
    # 300 x 200 stored image, XML at 3000 x 2000: boxes scaled per axis (official x * w_s / W - 1)
    wide = records["imgs/tb/tb0004.png"]
    assert (wide.width, wide.height) == (300, 200)
    assert wide.boxes == ((59.0, 39.0, 149.0, 99.0),)
    ds = CXRDataset([wide], image_size=32)
    assert torch.allclose(ds[0]["boxes"], torch.tensor([[59 * 32 / 300, 39 * 32 / 200, 149 * 32 / 300, 99 * 32 / 200]]))
    # 16-bit PNG: every value kept (/ 65535 since the maximum is above 4095), not skipped, not 8-bit
    image = read_image(records["imgs/sick/s0002.png"].path)
    assert image.dtype == np.float32 and image.shape == (64, 64)
    np.testing.assert_allclose(image, PNG16 / 65535.0, rtol=0, atol=1e-7)
    assert len(np.unique(image)) == 64 * 64
    # JPEG bytes behind a .png name
    jpeg = read_image(records["imgs/health/h0005.png"].path)
    assert jpeg.shape == (64, 64) and abs(float(jpeg.mean()) - 128 / 255) < 2 / 255


def test_float_dicom_with_nan_is_reported(tmp_path, make_dicom):
    """Float Pixel Data holding a NaN used to come back as an ALL-NaN image (min-max of NaN), which the
    uint8 image cache then silently turned into a black film."""
    pixels = np.arange(16, dtype=np.float32).reshape(4, 4)
    pixels[1, 2] = np.nan
    path = make_dicom(tmp_path / "float.dcm", with_pixels=False, BitsAllocated=32)
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.FloatPixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError) as info:
        read_image(path)
    assert info.value.path == str(path) and "1 non-finite pixel value(s)" in str(info.value)


# ------------------------------------------------------------------------------------ Kaggle layout
HEADER = "fname,image_height,image_width,source,bbox,target,tb_type,image_type"


def test_kaggle_malformed_bbox(tmp_path, helpers):
    root = tmp_path.resolve() / "kaggle"
    for name in ("h0001.png", "tb0001.png", "tb0002.png"):
        helpers.write_png(root / "images" / name)
    rows = [HEADER, "h0001.png,512,512,train,none,no_tb,none,healthy",
            "tb0001.png,512,512,train,\"{'xmin': 10, 'ymin': 20, 'width': 30, 'height': 40}\",tb,active_tb,tb",
            "tb0002.png,512,512,train,\"{'xmin': 10, 'ymin': 20, 'width': }\",tb,active_tb,tb"]
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as info:
        load_records(root, "train")
    assert info.value.path == str(root / "data.csv")
    assert "line 4, field 'bbox'" in str(info.value)
    records = load_records(root, "train", on_error="skip")
    assert [r.image for r in records] == ["images/h0001.png", "images/tb0001.png"]
    assert len(records.errors.skipped) == 1
    (path, why), = records.errors.skipped
    assert path == str(root / "data.csv") and why.startswith("line 4, field 'bbox'")

"""Case 4 (fuzzing) — random and mutated bytes into the three readers of untrusted files.

Property: ``parse_xml``, ``read_kaggle_csv`` (+ ``parse_bbox``) and ``read_image`` either return a valid
result or raise :class:`tbkd_lib.errors.DataError` naming the file; no bare OSError / ParseError / PIL /
pydicom / ValueError / SyntaxError / OverflowError escapes, and no box they accept is non-finite or
inverted. Seeded (``TBKD_RELIABILITY_SEED``) so a failure replays.
"""
from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from tbkd_lib.data import parse_xml, read_image, read_kaggle_csv
from tbkd_lib.data.kaggle import parse_bbox
from tbkd_lib.errors import DataError

SEED = int(os.environ.get("TBKD_RELIABILITY_SEED", "20251128"))
FUZZ = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

FRAGMENTS = [b"<", b">", b"</", b"/>", b"&", b"&amp;", b"&#0;", b"<!DOCTYPE a [<!ENTITY b 'c'>]>", b"<![CDATA[",
             b"1e999", b"-5", b"0", b"\xff\xfe", b"\x00", b"{", b"}", b"[]", b"{[]: 1}", b"'", b'"', b",",
             b"\n", b"\r", b"9" * 400, b"nan", b"inf", b"\xc3(", b"DICM"]


@st.composite
def mutated(draw, original: bytes, start: int = 0, tail: int = 0):
    """``original`` with 1-5 edits: delete a run, insert random bytes or a hostile fragment, or cut.

    Edits fall in ``[start, len - tail)`` (e.g. a DICOM's element headers, not its preamble or pixels)."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(min(start, len(data)), max(min(start, len(data)), len(data) - tail)))
        op = draw(st.sampled_from(["flip", "delete", "insert", "fragment", "cut"]))
        if op == "flip" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "fragment":
            data[i:i] = draw(st.sampled_from(FRAGMENTS))
        else:
            data = data[:i]
    return bytes(data)


def _write(folder, name: str, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


def _only_data_error(call, path):
    """``call()``'s result, or None when it raised a DataError naming ``path``; anything else fails."""
    try:
        return call()
    except DataError as exc:
        assert exc.path == str(path), f"DataError names {exc.path}, not the file {path}"
        return None


# ---------------------------------------------------------------------------------------- XML
def _voc(width, height, objects) -> bytes:
    parts = ["<annotation>", "<filename>tb0001</filename>", "<size>", f"<width>{width}</width>",
             f"<height>{height}</height>", "</size>"]
    for name, x0, y0, x1, y1 in objects:
        parts += ["<object>", f"<name>{name}</name>", "<bndbox>", f"<xmin>{x0}</xmin>", f"<ymin>{y0}</ymin>",
                  f"<xmax>{x1}</xmax>", f"<ymax>{y1}</ymax>", "</bndbox>", "</object>"]
    return "\n".join(parts + ["</annotation>"]).encode()


VALID_XML = _voc(2000, 2500, [("ActiveTuberculosis", 500, 625, 1000, 1250), ("PulmonaryTuberculosis", 1, 2, 3, 4)])
field = st.one_of(st.integers(-10**6, 10**6), st.text(max_size=12), st.sampled_from(["", " 7 ", "1e3", "0x10", "٣"]))
name = st.one_of(st.sampled_from(["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "x"]), st.text(max_size=8))
structured_xml = st.builds(_voc, field, field, st.lists(st.tuples(name, field, field, field, field), max_size=3))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _check_xml(folder, data: bytes):
    path = _write(folder, "tb0001.xml", data)
    ann = _only_data_error(lambda: parse_xml(path), path)
    if ann is not None:
        w, h = ann.size
        assert w > 0 and h > 0
        for x0, y0, x1, y1 in ann.boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (ann, data[:200])


@seed(SEED)
@FUZZ
@given(data=st.one_of(st.binary(max_size=3000), mutated(VALID_XML), structured_xml))
def test_parse_xml_only_raises_data_error(folder, data):
    _check_xml(folder, data)


# ------------------------------------------------------------------------------------ Kaggle CSV
HEADER = "fname,image_height,image_width,source,bbox,target,tb_type,image_type"
VALID_CSV = "\n".join([
    HEADER, "h1.png,512,512,train,none,no_tb,none,healthy",
    "tb1.png,512,512,train,\"{'xmin': 10, 'ymin': 20, 'width': 30, 'height': 40}\",tb,active_tb,tb",
    "tb1.png,512,512,train,\"{'xmin': 1.5, 'ymin': 2, 'width': 3e1, 'height': 4}\",tb,latent_tb,tb",
    "s1.png,512,512,val,none,no_tb,none,sick_but_no_tb"]).encode() + b"\n"
value = st.one_of(st.integers(-10**5, 10**5), st.integers(min_value=10**308), st.floats(), st.booleans(), st.none(),
                  st.text(max_size=6), st.lists(st.integers(), max_size=2))
bbox_dict = st.dictionaries(st.sampled_from(["xmin", "ymin", "width", "height", "junk"]), value, max_size=5).map(repr)
bbox_text = st.one_of(bbox_dict, st.text(max_size=40), st.sampled_from(["{[]: 1}", "{{}: 1}", "none", "None", "(" * 200]))


def _csv_row(bbox: str) -> bytes:
    quoted = '"' + bbox.replace('"', '""') + '"'
    return (f"{HEADER}\ntb1.png,512,512,train,{quoted},tb,active_tb,tb\n").encode("utf-8", "surrogatepass")


def _check_csv(folder, data: bytes):
    path = _write(folder, "data.csv", data)
    images = _only_data_error(lambda: read_kaggle_csv(path), path) or []
    for image in images:
        assert image.error is None or isinstance(image.error, DataError)
        for box in image.boxes:  # accepted boxes are finite and positive in size
            assert all(math.isfinite(v) for v in box) and box[0] < box[2] and box[1] < box[3], (box, data[:300])


@seed(SEED)
@FUZZ
@given(data=st.one_of(st.binary(max_size=2000), mutated(VALID_CSV), bbox_text.map(_csv_row)))
def test_kaggle_csv_only_raises_data_error(folder, data):
    _check_csv(folder, data)


@seed(SEED)
@FUZZ
@given(text=bbox_text)
def test_parse_bbox_only_raises_data_error(text):
    try:
        box = parse_bbox(text, "data.csv", 2)
    except DataError as exc:
        assert exc.path == "data.csv" and "line 2, field 'bbox'" in exc.problem
        return
    assert box is None or (all(math.isfinite(v) for v in box) and box[0] < box[2] and box[1] < box[3])


# ---------------------------------------------------------------------------------------- images
def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for key, array, fmt in (("png8", (rng.random((24, 20)) * 255).astype(np.uint8), "PNG"),
                            ("png16", (rng.random((24, 20)) * 60000).astype(np.uint16), "PNG"),
                            ("jpeg", (rng.random((24, 20, 3)) * 255).astype(np.uint8), "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        out[key] = buf.getvalue()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "OT", 8, 8, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = \
        "MONOCHROME1", 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth, ds.RescaleSlope, ds.RescaleIntercept = 2000, 1000, 1, 0
    ds.PixelData = (rng.random((8, 8)) * 4000).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out["dicom"] = buf.getvalue()
    return out


SEEDS = _seed_files()


@seed(SEED)
@settings(FUZZ, max_examples=150)
@given(data=st.one_of(st.binary(max_size=2000), st.sampled_from(sorted(SEEDS)).flatmap(lambda k: mutated(SEEDS[k]))),
       suffix=st.sampled_from([".png", ".dcm", ".jpg"]))
def test_read_image_only_raises_data_error(folder, data, suffix):
    path = _write(folder, "image" + suffix, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every odd element it still reads
        image = _only_data_error(lambda: read_image(path), path)
    if image is not None:
        assert image.dtype == np.float32 and image.ndim == 2
        assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


def test_the_seeds_themselves_are_readable(folder):
    for key, data in SEEDS.items():
        suffix = ".dcm" if key == "dicom" else ".png"
        assert read_image(_write(folder, f"seed{suffix}", data)).ndim == 2
    _check_xml(folder, VALID_XML)
    assert len(read_kaggle_csv(_write(folder, "data.csv", VALID_CSV))) == 3


def _element_offsets(data: bytes) -> list[tuple[int, int]]:
    """``(start, header length)`` of each explicit-VR little-endian element after the 132-byte preamble."""
    out, pos = [], 132
    while pos + 8 <= len(data):
        long_vr = data[pos + 4:pos + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR")
        header = 12 if long_vr else 8
        length = int.from_bytes(data[pos + 8:pos + 12] if long_vr else data[pos + 6:pos + 8], "little")
        out.append((pos, header))
        pos += header + length
    return out


@st.composite
def dicom_corrupted(draw, original: bytes):
    """A DICOM with 1-3 element-level faults: an unknown VR, a wrong length, a torn value or header."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        offsets = _element_offsets(bytes(data))
        if not offsets:
            break
        start, header = draw(st.sampled_from(offsets))
        fault = draw(st.sampled_from(["vr", "length", "tear", "cut"]))
        if fault == "vr":
            data[start + 4:start + 6] = draw(st.binary(min_size=2, max_size=2))
        elif fault == "length":
            at, size = (start + 8, 4) if header == 12 else (start + 6, 2)
            data[at:at + size] = draw(st.integers(0, 2 ** (8 * size) - 1)).to_bytes(size, "little")
        elif fault == "tear":
            at = draw(st.integers(start, start + header + 4))
            del data[at:at + draw(st.integers(1, 3))]
        else:
            data = data[:draw(st.integers(start, start + header + 2))]
    return bytes(data)


@seed(SEED)
@settings(FUZZ, max_examples=100)
@given(data=dicom_corrupted(SEEDS["dicom"]), suffix=st.sampled_from([".dcm", ".png"]))
def test_read_dicom_header_mutations_only_raise_data_error(folder, data, suffix):
    """pydicom parses elements lazily, so a corrupt element fails at first access, long after dcmread."""
    path = _write(folder, "dicom" + suffix, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = _only_data_error(lambda: read_image(path), path)
        size = _only_data_error(lambda: __import__("tbkd_lib.data", fromlist=["image_size"]).image_size(path), path)
    if image is not None:
        assert image.dtype == np.float32 and np.isfinite(image).all()
        assert size is None or size == (image.shape[1], image.shape[0])

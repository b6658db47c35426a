"""Shared fixtures: the real data in ``../shared/data`` (skipped when absent) and tiny synthetic layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (it lives in ../shared/data next to the repository)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` relative to the repository root; the test is skipped when it is absent."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def tbx11k_sample(shared_data) -> Path:
    """30 real TB images in the official TBX11K layout."""
    return _require(shared_data / "tbx11k-sample")


@pytest.fixture(scope="session")
def dicom_monochrome1(shared_data) -> Path:
    """A real 1955 x 1841 MONOCHROME1 chest CR file."""
    return _require(shared_data / "dicom" / "chest_cr_monochrome1.dcm")


# ------------------------------------------------------------------------------ synthetic files
def write_png(path: Path, size=(512, 512), value: int = 90, rgb: bool = True) -> Path:
    """A gray PNG of ``size`` = (width, height) stored as R = G = B (as TBX11K does) or mode L."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = np.full((size[1], size[0]), value, dtype=np.uint8)
    gray[: size[1] // 4, : size[0] // 4] = 200  # some structure
    image = Image.fromarray(np.stack([gray] * 3, axis=-1) if rgb else gray)
    image.save(path)
    return path


def voc_xml(filename: str, width: int, height: int, objects=()) -> str:
    """Text of a TBX11K box file (tab-indented like the release); ``objects`` = [(name, x0, y0, x1, y1)]."""
    parts = ["<annotation>", f"\t<filename>{filename}</filename>", "\t<segmented>0</segmented>",
             "\t<size>", f"\t\t<width>{width}</width>", f"\t\t<height>{height}</height>", "\t</size>"]
    for name, x0, y0, x1, y1 in objects:
        parts += ["\t<object>", f"\t\t<name>{name}</name>", "\t\t<pose>unspecified</pose>",
                  "\t\t<truncated>0</truncated>", "\t\t<difficult>0</difficult>", "\t\t<bndbox>",
                  f"\t\t\t<xmin>{x0}</xmin>", f"\t\t\t<ymin>{y0}</ymin>", f"\t\t\t<xmax>{x1}</xmax>",
                  f"\t\t\t<ymax>{y1}</ymax>", "\t\t</bndbox>", "\t</object>"]
    return "\n".join(parts + ["</annotation>"]) + "\n"


TINY_TRAIN = ["health/h0001.png", "tb/tb0003.png", "sick/s0001.png", "tb/tb1199.png"]
TINY_VAL = ["tb/tb0005.png"]
TINY_EXTRA = ["extra/mc+shenzhen/train/CHNCXR_0001_1.png", "extra/mc+shenzhen/train/MCUCXR_0002_0.png",
              "extra/da+db/train/p001.png", "extra/da+db/train/n002.png"]


def coco_json(lines, boxes_by_line) -> dict:
    """A TBX11K-style COCO dict (``info`` is a list); ``boxes_by_line`` = {line: [(cat_id, [x, y, w, h])]}."""
    cats = [{"id": 1, "name": "ActiveTuberculosis", "supercategory": "Tuberculosis"},
            {"id": 2, "name": "ObsoletePulmonaryTuberculosis", "supercategory": "Tuberculosis"},
            {"id": 3, "name": "PulmonaryTuberculosis", "supercategory": "Tuberculosis"}]
    images = [{"id": i, "file_name": line, "width": 512, "height": 512} for i, line in enumerate(lines, 1)]
    anns = []
    for i, line in enumerate(lines, 1):
        for cat, bbox in boxes_by_line.get(line, []):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "iscrowd": 0,
                         "area": int(bbox[2] * bbox[3]), "bbox": bbox})
    return {"info": [{"description": "tiny"}], "licenses": [], "categories": cats, "images": images,
            "annotations": anns}


@pytest.fixture
def tiny_tbx11k(tmp_path) -> Path:
    """A tiny official layout.

    train: h0001 (healthy), tb0003 (512 px; XML 2000 x 2500, one box 500,625,1000,1250 -> 127,127,255,255),
    s0001 (sick), tb1199 (TB, XML without object); val: tb0005 (stored 256 x 256; XML 1000 x 1000, box
    100,200,300,400 latent); all_train adds four extras. ``annotations/json/TBX11K_train.json`` agrees.
    """
    root = tmp_path / "TBX11K"
    for line in TINY_TRAIN + TINY_EXTRA:
        write_png(root / "imgs" / line)
    write_png(root / "imgs" / "tb" / "tb0005.png", size=(256, 256))
    xml = root / "annotations" / "xml"
    xml.mkdir(parents=True)
    (xml / "tb0003.xml").write_text(voc_xml("tb0003", 2000, 2500, [("ActiveTuberculosis", 500, 625, 1000, 1250)]))
    (xml / "tb1199.xml").write_text(voc_xml("tb1199", 2017, 2008))
    latent = [("ObsoletePulmonaryTuberculosis", 100, 200, 300, 400)]
    (xml / "tb0005.xml").write_text(voc_xml("tb0005", 1000, 1000, latent))
    lists = root / "lists"
    lists.mkdir()
    (lists / "TBX11K_train.txt").write_text("\n".join(TINY_TRAIN) + "\n")
    (lists / "TBX11K_val.txt").write_text("\n".join(TINY_VAL) + "\n")
    (lists / "TBX11K_trainval.txt").write_text("\n".join(TINY_TRAIN + TINY_VAL) + "\n")
    (lists / "all_train.txt").write_text("\n".join(TINY_TRAIN + TINY_EXTRA) + "\n")
    js = root / "annotations" / "json"
    js.mkdir()
    coco = coco_json(TINY_TRAIN, {"tb/tb0003.png": [(1, [127.0, 127.0, 128.0, 128.0])]})
    (js / "TBX11K_train.json").write_text(json.dumps(coco))
    return root


@pytest.fixture
def make_dicom():
    """Factory ``make_dicom(path, pixels, photometric="MONOCHROME2", with_pixels=True, **elements)``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    def make(path: Path, pixels=None, photometric: str = "MONOCHROME2", with_pixels: bool = True,
             bits_stored: int = 12, **elements) -> Path:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality = "OT"
        pixels = np.asarray(pixels if pixels is not None else np.zeros((4, 4)), dtype=np.uint16)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
        for key, value in elements.items():
            setattr(ds, key, value)
        if with_pixels:
            ds.PixelData = pixels.tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
        except TypeError:  # pragma: no cover - pydicom 2.x
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(path, write_like_original=False)
        return path

    return make


@pytest.fixture(scope="session")
def helpers():
    """The file writers above, for tests: ``helpers.write_png``, ``helpers.voc_xml``, ``helpers.coco_json``."""
    from types import SimpleNamespace

    return SimpleNamespace(write_png=write_png, voc_xml=voc_xml, coco_json=coco_json,
                           TINY_TRAIN=TINY_TRAIN, TINY_VAL=TINY_VAL, TINY_EXTRA=TINY_EXTRA)

"""Chest X-ray data: readers (TBX11K official + Kaggle layouts, PNG/JPEG/DICOM), records, the dataset.

Start with ``load_records(root, split)`` -> list of :class:`Record`, then
``CXRDataset(records, image_size, augment=...)`` and ``DataLoader(..., collate_fn=collate)``.
"""
from __future__ import annotations

from .dataset import CXRDataset, ImageCache, boxes_to_size, build_augment, collate, item_seed
from .dicom import read_dicom
from .images import image_size, is_dicom, probe_image, read_image, read_image_uint8_resized
from .kaggle import load_kaggle, read_kaggle_csv
from .layout import LAYOUTS, SPLITS, Records, detect_layout, load_records, summarize
from .records import LABELS, SCHEMES, ErrorLog, Record, class_names, label_index, tb_index
from .tbx11k import load_tbx11k, parse_xml, read_coco, read_list, scale_box

__all__ = [
    "Record", "Records", "LABELS", "SCHEMES", "class_names", "label_index", "tb_index", "ErrorLog",
    "read_image", "read_image_uint8_resized", "image_size", "probe_image", "is_dicom", "read_dicom",
    "read_list", "parse_xml", "scale_box", "read_coco", "load_tbx11k", "read_kaggle_csv", "load_kaggle",
    "LAYOUTS", "SPLITS", "detect_layout", "load_records", "summarize",
    "ImageCache", "CXRDataset", "collate", "boxes_to_size", "build_augment", "item_seed",
]

try:  # written by another module owner; the data readers must not depend on it
    from .phantom import generate_phantoms, render_phantom
except ModuleNotFoundError as exc:  # pragma: no cover - until phantom.py lands
    if exc.name != f"{__name__}.phantom":
        raise  # phantom.py exists but is broken: say so
else:
    __all__ += ["generate_phantoms", "render_phantom"]

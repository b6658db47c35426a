"""Find out which layout a data folder uses, load its records, and summarize them.

Two layouts are read (``docs/TBX11K-FORMAT.md``): the official TBX11K release (``imgs/`` + ``lists/`` +
``annotations/``; the phantoms use it too) and Kaggle's "TBX11K Simplified" (``images/`` + ``data.csv``).

Skip mode: ``load_records(..., on_error="skip")`` drops every bad image / XML / CSV row and records why.
The result is a :class:`Records` list whose ``errors`` attribute is the :class:`ErrorLog`
(``records.errors.skipped`` is a list of ``(path, problem)``; ``records.errors.summary()`` prints it).
Skip mode never hides an empty result: zero records is a ``DataError`` in both modes.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from .kaggle import load_kaggle
from .records import LABELS, ErrorLog, Record, class_names, label_index
from .tbx11k import SPLIT_LISTS, load_tbx11k

__all__ = ["LAYOUTS", "SPLITS", "Records", "detect_layout", "load_records", "summarize"]

LAYOUTS = ("tbx11k", "kaggle")
SPLITS = tuple(SPLIT_LISTS)  # Kaggle: train, val, trainval only
_EXPECTED = ("expected the official TBX11K layout (imgs/, lists/, annotations/) or the Kaggle "
             "'TBX11K Simplified' layout (images/ + data.csv)")


class Records(list):
    """A ``list[Record]`` that also carries how it was loaded.

    ``errors``: the :class:`ErrorLog` (``errors.skipped`` lists ``(path, problem)`` of skipped files);
    ``root``, ``split``, ``layout``: where the records came from. Slicing returns a plain list.
    """

    def __init__(self, records: Iterable[Record] = (), errors: ErrorLog | None = None,
                 root: Path | None = None, split: str | None = None, layout: str | None = None):
        super().__init__(records)
        self.errors = errors if errors is not None else ErrorLog("raise")
        self.root, self.split, self.layout = root, split, layout


def _is_tbx11k(root: Path) -> bool:
    return (root / "imgs").is_dir() and (root / "lists").is_dir()


def _is_kaggle(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "data.csv").is_file()


def detect_layout(root: str | os.PathLike) -> str:
    """``"tbx11k"`` or ``"kaggle"``; ``DataError`` naming the folder and what was expected otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, f"data folder not found; {_EXPECTED}")
    if _is_tbx11k(root):
        return "tbx11k"
    if _is_kaggle(root):
        return "kaggle"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    inner = [p.name for p in sorted(root.iterdir()) if p.is_dir() and (_is_tbx11k(p) or _is_kaggle(p))]
    hint = f"; did you mean {root / inner[0]}?" if inner else ""
    listing = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") if found else "nothing"
    raise DataError(root, f"unknown data layout: found {listing}; {_EXPECTED}{hint}")


def load_records(root: str | os.PathLike, split: str = "train", scheme: str | None = None,
                 on_error: str = "raise", decode: bool = False) -> Records:
    """Load the records of ``split`` from a TBX11K or Kaggle root, in list (or CSV) order.

    ``split``: ``train``, ``val``, ``trainval`` (TBX11K_* lists / Kaggle ``source``) or ``all_train``,
    ``all_val``, ``all_trainval`` (official layout only: TBX11K + extra/). ``scheme`` (optional) is
    checked up front, with every label, so that a typo fails before a long load. ``on_error``:
    ``"raise"`` at the first bad file, or ``"skip"`` it and log it in ``records.errors``.
    ``decode=True`` decodes every pixel while loading (catches truncated files; about 5 ms an image);
    by default only headers are read (missing, empty and non-image files are still caught).
    Returns :class:`Records`; raises ``DataError`` when no record is left.
    """
    if scheme is not None:
        class_names(scheme)
    root = Path(root)
    layout = detect_layout(root)
    log = ErrorLog(on_error)
    loader = load_tbx11k if layout == "tbx11k" else load_kaggle
    records = Records(loader(root, split, log=log, decode=decode), errors=log, root=root.resolve(),
                      split=split, layout=layout)
    if not records:
        raise DataError(root, f"no usable record in split {split!r} ({layout} layout); {log.summary()}")
    if scheme is not None:
        for record in records:
            label_index(record.label, scheme)
    return records


def summarize(records: Iterable[Record], scheme: str | None = None) -> dict:
    """Counts for ``tbkd inspect``: images, labels (and classes under ``scheme``), sources, boxes.

    ``labels`` maps each label to its image count; ``per_label`` to ``{"images": n, "boxes": k}``;
    ``boxes_per_image`` maps a box count to the number of images with it (all images);
    ``tb_without_boxes`` counts TB records with no box (tb1199, TB extras); ``skipped`` is present when
    ``records`` is a :class:`Records` list.
    """
    records = list(records) if not isinstance(records, list) else records
    labels = Counter(r.label for r in records)
    out = {
        "n_images": len(records),
        "labels": {name: labels.get(name, 0) for name in LABELS},
        "per_label": {name: {"images": labels.get(name, 0),
                             "boxes": sum(len(r.boxes) for r in records if r.label == name)} for name in LABELS},
        "sources": dict(sorted(Counter(r.source for r in records).items())),
        "n_boxes": sum(len(r.boxes) for r in records),
        "boxes_per_image": dict(sorted(Counter(len(r.boxes) for r in records).items())),
        "tb_without_boxes": sum(1 for r in records if r.label == "tb" and not r.boxes),
        "categories": dict(sorted(Counter(c for r in records for c in r.categories).items())),
        "image_sizes": dict(sorted(Counter(f"{r.width}x{r.height}" for r in records).items())),
    }
    if scheme is not None:
        classes = Counter(label_index(r.label, scheme) for r in records)
        out["classes"] = {name: classes.get(i, 0) for i, name in enumerate(class_names(scheme))}
    if isinstance(records, Records):
        out["skipped"] = len(records.errors.skipped)
    return out


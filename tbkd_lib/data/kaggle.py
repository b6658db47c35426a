"""Reader for the Kaggle "TBX11K Simplified" layout: ``images/`` + ``data.csv``.

``data.csv`` has the header ``fname,image_height,image_width,source,bbox,target,tb_type,image_type`` and
ONE ROW PER BOX: a TB image with k boxes has k rows (grouped here by ``fname``, first-appearance order).

- ``bbox`` is ``none`` or a Python dict literal ``{'xmin': .., 'ymin': .., 'width': .., 'height': ..}`` in
  the CSV's ``image_width x image_height`` space (512 x 512), already in the COCO convention (the
  official ``- 1`` is included); it becomes xyxy ``(xmin, ymin, xmin + width, ymin + height)``, rescaled
  to the stored image size if that differs.
- split from ``source`` (``train``/``val``; ``trainval`` = both); label from ``image_type``
  (``healthy`` -> healthy, ``sick_but_no_tb`` -> sick, ``tb`` -> tb); box category from ``tb_type``
  (``active_tb`` -> ActiveTuberculosis, ``latent_tb`` -> ObsoletePulmonaryTuberculosis).
- ``Record.image`` = ``images/<fname>``, ``Record.source`` = ``"tbx11k"`` (they are TBX11K images).

Errors name the CSV, the line number (header = line 1) and the field.
"""
from __future__ import annotations

import ast
import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .images import probe_image
from .records import ErrorLog, Record

__all__ = ["KAGGLE_COLUMNS", "KAGGLE_SPLITS", "IMAGE_TYPES", "TB_TYPES", "KaggleImage", "parse_bbox",
           "read_kaggle_csv", "load_kaggle"]

KAGGLE_COLUMNS = ("fname", "image_height", "image_width", "source", "bbox", "target", "tb_type", "image_type")
KAGGLE_SPLITS = {"train": ("train",), "val": ("val",), "trainval": ("train", "val")}
IMAGE_TYPES = {"healthy": "healthy", "sick_but_no_tb": "sick", "tb": "tb"}
TB_TYPES = {"active_tb": "ActiveTuberculosis", "latent_tb": "ObsoletePulmonaryTuberculosis"}
_TARGETS = {"healthy": "no_tb", "sick": "no_tb", "tb": "tb"}
_BBOX_KEYS = ("xmin", "ymin", "width", "height")

Box = tuple[float, float, float, float]


@dataclass
class KaggleImage:
    """All rows of one ``fname``: split, label, CSV size (width, height), boxes xyxy, categories."""

    fname: str
    line: int
    source: str
    label: str
    size: tuple[int, int]
    boxes: list[Box] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    error: DataError | None = None


def _fail(csv_path: Path, line: int, column: str, problem: str) -> DataError:
    return DataError(csv_path, f"line {line}, field {column!r}: {problem}")


def parse_bbox(text: str, csv_path: Path | str = "<csv>", line: int = 0) -> Box | None:
    """``'none'`` -> None; a dict literal -> xyxy floats. Raises ``DataError`` naming CSV, line, field."""
    text = (text or "").strip()
    if text.lower() == "none":
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # TypeError: {[]: 1}
        raise _fail(Path(csv_path), line, "bbox", f"{text!r} is not a dict literal; expected 'none' or "
                                                  "{'xmin': x, 'ymin': y, 'width': w, 'height': h}") from None
    if not isinstance(value, dict) or any(k not in value for k in _BBOX_KEYS):
        raise _fail(Path(csv_path), line, "bbox", f"{text!r}; expected a dict with keys {_BBOX_KEYS}")
    numbers = [value[k] for k in _BBOX_KEYS]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise _fail(Path(csv_path), line, "bbox", f"{text!r}; expected numeric {_BBOX_KEYS}")
    try:
        x, y, w, h = (float(v) for v in numbers)
    except OverflowError:  # an integer beyond the float range
        x = y = w = h = math.inf
    box = (x, y, x + w, y + h)
    if not all(math.isfinite(v) for v in box + (w, h)):
        raise _fail(Path(csv_path), line, "bbox", f"{text!r}; expected finite numbers")
    if not (box[2] > box[0] and box[3] > box[1]):  # also a size lost to rounding: 1e16 + 1 == 1e16
        raise _fail(Path(csv_path), line, "bbox", f"{text!r}; expected width > 0 and height > 0")
    return box


def _size(row: dict, csv_path: Path, line: int) -> tuple[int, int]:
    out = []
    for column in ("image_width", "image_height"):
        try:
            value = int(str(row[column]).strip())
        except ValueError:
            value = 0
        if value <= 0:
            raise _fail(csv_path, line, column, f"{row[column]!r}; expected a positive integer")
        out.append(value)
    return out[0], out[1]


def _choice(row: dict, column: str, allowed, csv_path: Path, line: int) -> str:
    value = str(row[column]).strip()
    if value not in allowed:
        raise _fail(csv_path, line, column, f"{value!r}; expected one of {sorted(allowed)}")
    return value


def _new_image(row: dict, fname: str, csv_path: Path, line: int) -> KaggleImage:
    source = _choice(row, "source", ("train", "val"), csv_path, line)
    label = IMAGE_TYPES[_choice(row, "image_type", IMAGE_TYPES, csv_path, line)]
    target = _choice(row, "target", ("tb", "no_tb"), csv_path, line)
    if target != _TARGETS[label]:
        raise _fail(csv_path, line, "target", f"{target!r} contradicts image_type; expected {_TARGETS[label]!r}")
    return KaggleImage(fname, line, source, label, _size(row, csv_path, line))


def _add_row(image: KaggleImage, row: dict, csv_path: Path, line: int) -> None:
    """Check that a further row of ``image`` agrees with its first one, then add its box."""
    again = _new_image(row, image.fname, csv_path, line)
    for column, a, b in (("source", again.source, image.source), ("image_type", again.label, image.label),
                         ("image_width/image_height", again.size, image.size)):
        if a != b:
            raise _fail(csv_path, line, column, f"{a!r} differs from line {image.line} ({b!r}) for the same fname")
    box = parse_bbox(row["bbox"], csv_path, line)
    if box is None:
        return
    if image.label != "tb":
        raise _fail(csv_path, line, "bbox", f"a box on a {image.label!r} image; expected 'none'")
    image.boxes.append(box)
    image.categories.append(TB_TYPES[_choice(row, "tb_type", TB_TYPES, csv_path, line)])


def _header(reader: csv.DictReader, csv_path: Path) -> None:
    columns = tuple(c.strip() for c in (reader.fieldnames or ()))
    missing = [c for c in KAGGLE_COLUMNS if c not in columns]
    if missing:
        raise DataError(csv_path, f"line 1: header {','.join(columns) or '(empty)'} lacks {missing}; "
                                  f"expected {','.join(KAGGLE_COLUMNS)}")


def read_kaggle_csv(path: str | os.PathLike) -> list[KaggleImage]:
    """Group ``data.csv`` rows by ``fname`` (first-appearance order).

    A bad header or unreadable file raises ``DataError``; a bad row marks its image with ``error``
    (the first one) so that the caller can raise or skip it.
    """
    csv_path = Path(path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            _header(reader, csv_path)
            reader.fieldnames = [c.strip() for c in reader.fieldnames]
            return _group_rows(reader, csv_path)
    except FileNotFoundError:
        raise DataError(csv_path, f"file not found; expected a CSV with header {','.join(KAGGLE_COLUMNS)}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(csv_path, f"cannot read CSV ({type(exc).__name__}: {exc})") from None


def _group_rows(reader: csv.DictReader, csv_path: Path) -> list[KaggleImage]:
    images: dict[str, KaggleImage] = {}
    for row in reader:
        line = reader.line_num
        fname = str(row.get("fname") or "").strip()
        key = fname or f"<line {line}>"
        image = images.get(key)
        try:
            missing = [c for c in KAGGLE_COLUMNS if row.get(c) is None]
            if missing:
                raise _fail(csv_path, line, missing[0], f"missing: the row has fewer than {len(KAGGLE_COLUMNS)} fields")
            if not fname:
                raise _fail(csv_path, line, "fname", "empty; expected an image file name")
            if image is None:
                image = images[key] = _new_image(row, fname, csv_path, line)
            if image.error is None:
                _add_row(image, row, csv_path, line)
        except DataError as exc:
            image = images.setdefault(key, KaggleImage(fname, line, "", "", (0, 0)))
            image.error = image.error or exc
    return list(images.values())


def _kaggle_record(root: Path, image: KaggleImage, csv_path: Path, decode: bool) -> Record:
    if image.error is not None:
        raise image.error
    image_path = root / "images" / image.fname
    if not image_path.exists():
        raise DataError(csv_path, f"line {image.line}: listed image {image_path} does not exist")
    stored = probe_image(image_path, decode=decode)
    sx, sy = stored[0] / image.size[0], stored[1] / image.size[1]
    boxes = tuple((x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in image.boxes)
    return Record(image=f"images/{image.fname}", path=image_path, label=image.label, boxes=boxes,
                  categories=tuple(image.categories), width=stored[0], height=stored[1], source="tbx11k")


def load_kaggle(root: str | os.PathLike, split: str = "train", log: ErrorLog | None = None,
                decode: bool = False) -> list[Record]:
    """Records of ``split`` (``train``, ``val`` or ``trainval``) in CSV order.

    An unknown split, a missing/unreadable CSV or a bad header always raise; per-image problems go to
    ``log`` (``ErrorLog("raise")`` by default). ``decode=True`` fully decodes every image.
    """
    root = Path(root).resolve()
    log = log if log is not None else ErrorLog("raise")
    csv_path = root / "data.csv"
    if split not in KAGGLE_SPLITS:
        raise DataError(csv_path, f"unknown split {split!r} for the Kaggle layout; expected one of "
                                  f"{sorted(KAGGLE_SPLITS)} (it has no extra/ or all_* lists)")
    records = []
    for image in read_kaggle_csv(csv_path):
        if image.source and image.source not in KAGGLE_SPLITS[split]:
            continue  # an image whose split could not be read is reported in every split
        try:
            records.append(_kaggle_record(root, image, csv_path, decode))
        except DataError as exc:
            log.report(exc)
    return records

"""Reader for the official TBX11K release layout (``imgs/``, ``lists/``, ``annotations/``).

See ``docs/TBX11K-FORMAT.md`` for every format detail. Conventions this reader fixes:

- **Labels come from the folder** of a list line: ``health/`` -> ``healthy``, ``sick/`` -> ``sick``,
  ``tb/`` -> ``tb`` (``source="tbx11k"``). Extras (``source="extra"``): ``extra/mc+shenzhen/...`` is TB
  when the stem ends in ``_1`` and a normal control when it ends in ``_0``; ``extra/da+db/...`` is TB
  when the name starts with ``p`` and normal when it starts with ``n``. Both data sets' negatives are
  normal controls, so non-TB extras are labelled ``healthy`` (never ``sick``). Extras have no boxes.
- ``test/`` lines are refused: the test labels are not public (they live on the challenge server).
- **Boxes**: the XML holds integers at the ORIGINAL resolution; like the official XML->COCO converter we
  scale each axis on its own, then subtract 1 (VOC 1-based -> 0-based):
  ``x_s = x * w_s / W - 1``, ``y_s = y * h_s / H - 1`` where ``(W, H)`` is the XML size and
  ``(w_s, h_s)`` the ACTUAL stored image size read from its header (512 x 512 in the release). A box
  touching the original border may therefore start at -1; records keep the official numbers and the
  Dataset clips boxes to the image.
- ``tb1199`` (a TB image whose XML has no object) is kept as a TB record with zero boxes.
- If ``annotations/json/<list name>.json`` (COCO, ``info`` is a list) exists, its boxes must agree with
  the XML ones within ``COCO_TOLERANCE`` px per coordinate (same count, matched by best IoU, same
  category); a disagreement is a ``DataError`` naming both files. The XML stays the source of truth.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from ..errors import DataError
from .images import probe_image
from .records import ErrorLog, Record

__all__ = ["SPLIT_LISTS", "BOX_CATEGORIES", "COCO_TOLERANCE", "XmlAnnotation", "CocoImage", "read_list",
           "label_for_line", "parse_xml", "scale_box", "read_coco", "check_agreement", "load_tbx11k"]

SPLIT_LISTS = {
    "train": "TBX11K_train.txt", "val": "TBX11K_val.txt", "trainval": "TBX11K_trainval.txt",
    "all_train": "all_train.txt", "all_val": "all_val.txt", "all_trainval": "all_trainval.txt",
}
BOX_CATEGORIES = ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
COCO_TOLERANCE = 1.5  # px in stored-image space, per coordinate
_FOLDER_LABELS = {"health": "healthy", "sick": "sick", "tb": "tb"}

Box = tuple[float, float, float, float]


class XmlAnnotation(NamedTuple):
    """One XML file: ``boxes`` xyxy ints at the ORIGINAL resolution, ``names`` per box, ``size`` (W, H)."""

    boxes: list[tuple[int, int, int, int]]
    names: list[str]
    size: tuple[int, int]


class CocoImage(NamedTuple):
    """One COCO image entry: ``boxes`` xyxy floats in the entry's ``size`` (width, height) space."""

    boxes: list[Box]
    names: list[str]
    size: tuple[int, int]


# ----------------------------------------------------------------------------------------- lists
def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` for each non-blank line of a list file (1-based numbers)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "list file not found; expected one image path (relative to imgs/) per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read list file ({type(exc).__name__}: {exc})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise DataError(path, "empty list file; expected one image path (relative to imgs/) per line")
    return lines


def read_list(path: str | os.PathLike) -> list[str]:
    """Lines of a list file (paths relative to ``imgs/``), blank lines dropped, CR/LF tolerant.

    Raises ``DataError`` when the file is missing, unreadable or holds no line.
    """
    return [line for _, line in _numbered_lines(Path(path))]


def _extra_label(parts: tuple[str, ...]) -> str:
    """Label of an ``extra/<set>/.../<name>`` line (see the module docstring); ValueError if unknown."""
    subset, name = parts[1] if len(parts) > 2 else "", parts[-1]
    stem = PurePosixPath(name).stem.lower()
    if subset == "mc+shenzhen":
        if stem.endswith("_1"):
            return "tb"
        if stem.endswith("_0"):
            return "healthy"
        raise ValueError(f"extra/mc+shenzhen file name {name!r} ends neither in _1 (TB) nor _0 (normal)")
    if subset == "da+db":
        if stem.startswith("p"):
            return "tb"
        if stem.startswith("n"):
            return "healthy"
        raise ValueError(f"extra/da+db file name {name!r} starts neither with p (TB) nor n (normal)")
    raise ValueError(f"unknown extra subset {subset!r}; expected extra/mc+shenzhen/ or extra/da+db/")


def label_for_line(line: str) -> tuple[str, str]:
    """``(label, source)`` of a list line such as ``tb/tb0003.png``; ``ValueError`` explains a refusal."""
    parts = PurePosixPath(line).parts
    if not parts or line.startswith("/") or ".." in parts or len(parts) < 2:
        raise ValueError("expected a relative path like tb/tb0003.png")
    folder = parts[0]
    if folder in _FOLDER_LABELS:
        return _FOLDER_LABELS[folder], "tbx11k"
    if folder == "extra":
        return _extra_label(parts), "extra"
    if folder == "test":
        raise ValueError("test labels are not public (they are scored on the challenge server); "
                         "expected a train/val list")
    raise ValueError(f"unknown folder {folder!r}; expected health/, sick/, tb/ or extra/")


# ------------------------------------------------------------------------------------------- XML
def _int_tag(node: ET.Element, tag: str, where: str, path: Path) -> int:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(path, f"missing tag <{where}{tag}>; expected an integer")
    try:
        return int(child.text.strip())
    except ValueError:
        raise DataError(path, f"<{where}{tag}> = {child.text.strip()!r}; expected an integer") from None


def _parse_object(obj: ET.Element, k: int, size: tuple[int, int], path: Path):
    """One ``<object>``: validated ``(xmin, ymin, xmax, ymax)`` and name."""
    where = f"object[{k}]/"
    name_node = obj.find("name")
    name = (name_node.text or "").strip() if name_node is not None else ""
    if name not in BOX_CATEGORIES:
        raise DataError(path, f"<{where}name> = {name!r}; expected one of {BOX_CATEGORIES}")
    bnd = obj.find("bndbox")
    if bnd is None:
        raise DataError(path, f"missing tag <{where}bndbox>")
    x0, y0, x1, y1 = (_int_tag(bnd, t, where + "bndbox/", path) for t in ("xmin", "ymin", "xmax", "ymax"))
    if x1 <= x0:
        raise DataError(path, f"<{where}bndbox/xmax> = {x1} <= xmin = {x0}; expected xmax > xmin")
    if y1 <= y0:
        raise DataError(path, f"<{where}bndbox/ymax> = {y1} <= ymin = {y0}; expected ymax > ymin")
    width, height = size
    for tag, value, limit in (("xmin", x0, width), ("ymin", y0, height), ("xmax", x1, width), ("ymax", y1, height)):
        if not 0 <= value <= limit:
            raise DataError(path, f"<{where}bndbox/{tag}> = {value} is outside the original image "
                                  f"({width} x {height}); expected 0 <= {tag} <= {limit}")
    return (x0, y0, x1, y1), name


def parse_xml(path: str | os.PathLike) -> XmlAnnotation:
    """Parse a TBX11K box file. Boxes are at the ORIGINAL resolution given by ``size`` = (W, H).

    Raises ``DataError`` naming the file and the tag for malformed XML, a missing tag, a non-integer
    coordinate, ``xmax <= xmin``, a box outside the original image or an unknown box name.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(path, "box file not found; expected a Pascal-VOC XML annotation") from None
    except (ET.ParseError, OSError) as exc:
        raise DataError(path, f"malformed XML ({exc}); expected a Pascal-VOC <annotation>") from None
    if root.tag != "annotation":
        raise DataError(path, f"root tag <{root.tag}>; expected <annotation>")
    size_node = root.find("size")
    if size_node is None:
        raise DataError(path, "missing tag <size>; expected <size><width>..</width><height>..</height></size>")
    size = (_int_tag(size_node, "width", "size/", path), _int_tag(size_node, "height", "size/", path))
    if min(size) <= 0:
        raise DataError(path, f"<size> = {size}; expected a positive width and height")
    boxes, names = [], []
    for k, obj in enumerate(root.findall("object")):
        box, name = _parse_object(obj, k, size, path)
        boxes.append(box)
        names.append(name)
    return XmlAnnotation(boxes, names, size)


def scale_box(box, original_size: tuple[int, int], stored_size: tuple[int, int] = (512, 512)) -> Box:
    """Map an XML box to the stored image, as the official converter: ``x * w_s / W - 1`` per axis.

    ``original_size`` and ``stored_size`` are ``(width, height)``. Returns floats ``(x0, y0, x1, y1)``.
    """
    (big_w, big_h), (small_w, small_h) = original_size, stored_size
    x0, y0, x1, y1 = box
    return (x0 * small_w / big_w - 1, y0 * small_h / big_h - 1,
            x1 * small_w / big_w - 1, y1 * small_h / big_h - 1)


# ------------------------------------------------------------------------------------------ COCO
def _coco_tables(data, path: Path) -> tuple[list, list, list]:
    if not isinstance(data, dict):
        raise DataError(path, "expected a COCO JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(path, f"key {key!r} missing or not a list; expected COCO JSON")
    return data["images"], data["annotations"], data["categories"]


def _coco_bbox(ann, k: int, path: Path) -> Box:
    bbox = ann.get("bbox") if isinstance(ann, dict) else None
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise DataError(path, f"annotations[{k}].bbox = {bbox!r}; expected [x, y, w, h] numbers")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise DataError(path, f"annotations[{k}].bbox = {bbox!r}; expected w > 0 and h > 0")
    return (x, y, x + w, y + h)


def read_coco(path: str | os.PathLike) -> dict[str, CocoImage]:
    """Read a TBX11K COCO file into ``{file_name (list line): CocoImage}`` with xyxy boxes.

    ``info`` may be a list (as in the release) or a dict; it is not used. Raises ``DataError``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot read COCO JSON ({type(exc).__name__}: {exc})") from None
    images, annotations, categories = _coco_tables(data, path)
    try:
        names = {int(c["id"]): str(c["name"]) for c in categories}
        entries = {int(im["id"]): (str(im["file_name"]), int(im["width"]), int(im["height"])) for im in images}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(path, f"bad categories/images entry ({type(exc).__name__}: {exc}); "
                              "expected id, name / id, file_name, width, height") from None
    out = {fname: CocoImage([], [], (w, h)) for fname, w, h in entries.values()}
    for k, ann in enumerate(annotations):
        box = _coco_bbox(ann, k, path)
        image_id, cat_id = ann.get("image_id"), ann.get("category_id")
        if image_id not in entries or cat_id not in names:
            raise DataError(path, f"annotations[{k}] refers to image_id={image_id!r}, category_id={cat_id!r}; "
                                  "expected ids listed under images and categories")
        entry = out[entries[image_id][0]]
        entry.boxes.append(box)
        entry.names.append(names[cat_id])
    return out


def _iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _match(boxes_a: list[Box], boxes_b: list[Box]) -> list[tuple[int, int]]:
    """Greedy best-IoU one-to-one matching of two equally long box lists."""
    pairs = sorted(((_iou(a, b), i, j) for i, a in enumerate(boxes_a) for j, b in enumerate(boxes_b)),
                   reverse=True)
    used_a, used_b, out = set(), set(), []
    for _, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i), used_b.add(j), out.append((i, j))
    return sorted(out)


def check_agreement(boxes: list[Box], names: list[str], coco: CocoImage, stored_size: tuple[int, int],
                    xml_path: Path | str, json_path: Path | str, tol: float = COCO_TOLERANCE) -> None:
    """Raise ``DataError`` naming both files unless ``boxes`` (stored space) agree with ``coco``.

    COCO boxes are first rescaled from the entry's size to ``stored_size`` (identity in the release).
    """
    sx, sy = stored_size[0] / coco.size[0], stored_size[1] / coco.size[1]
    other = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in coco.boxes]
    both = f"{xml_path} disagrees with {json_path}"
    if len(other) != len(boxes):
        raise DataError(xml_path, f"{both}: {len(boxes)} box(es) vs {len(other)}; expected the same boxes")
    for i, j in _match(boxes, other):
        diff = max(abs(u - v) for u, v in zip(boxes[i], other[j]))
        if diff > tol:
            raise DataError(xml_path, f"{both}: box {i} {tuple(round(v, 2) for v in boxes[i])} vs "
                                      f"{tuple(round(v, 2) for v in other[j])} (off by {diff:.2f} px); "
                                      f"expected agreement within {tol} px")
        if names[i] != coco.names[j]:
            raise DataError(xml_path, f"{both}: box {i} is {names[i]!r} vs {coco.names[j]!r}")


# ---------------------------------------------------------------------------------------- loader
def _list_path(root: Path, split: str) -> Path:
    if split not in SPLIT_LISTS:
        hint = " (test labels are not public)" if "test" in split else ""
        raise DataError(root / "lists", f"unknown split {split!r}{hint}; expected one of {sorted(SPLIT_LISTS)}")
    return root / "lists" / SPLIT_LISTS[split]


def _load_coco_for(root: Path, list_path: Path) -> tuple[Path, dict[str, CocoImage]] | None:
    json_path = root / "annotations" / "json" / (list_path.stem + ".json")
    return (json_path, read_coco(json_path)) if json_path.is_file() else None


def _record(root: Path, line: str, n: int, list_path: Path, coco, decode: bool) -> Record:
    """Build the record of list line ``n`` (1-based); DataError names the file at fault."""
    try:
        label, source = label_for_line(line)
    except ValueError as exc:
        raise DataError(list_path, f"line {n}: {line!r}: {exc}") from None
    image_path = root / "imgs" / line
    if not image_path.exists():
        raise DataError(list_path, f"line {n}: listed image {image_path} does not exist")
    stored = probe_image(image_path, decode=decode)
    boxes, names, xml_path = [], [], None
    if source == "tbx11k" and label == "tb":
        xml_path = root / "annotations" / "xml" / (PurePosixPath(line).stem + ".xml")
        if not xml_path.is_file():
            raise DataError(xml_path, f"missing box file for TB image {image_path} (listed in {list_path}, "
                                      f"line {n}); expected annotations/xml/<stem>.xml")
        ann = parse_xml(xml_path)
        boxes, names = [scale_box(b, ann.size, stored) for b in ann.boxes], list(ann.names)
    if coco is not None and line in coco[1]:
        check_agreement(boxes, names, coco[1][line], stored, xml_path or image_path, coco[0])
    return Record(image=f"imgs/{line}", path=image_path, label=label, boxes=tuple(boxes),
                  categories=tuple(names), width=stored[0], height=stored[1], source=source)


def load_tbx11k(root: str | os.PathLike, split: str = "train", log: ErrorLog | None = None,
                decode: bool = False) -> list[Record]:
    """Records of ``lists/<split list>`` in list order.

    File-level problems (unknown split, missing/empty list, unreadable COCO JSON) always raise;
    per-image problems (bad line, missing image, bad XML, JSON disagreement) go to ``log``
    (``ErrorLog("raise")`` by default). ``decode=True`` fully decodes every image while loading.
    """
    root = Path(root).resolve()
    log = log if log is not None else ErrorLog("raise")
    list_path = _list_path(root, split)
    lines = _numbered_lines(list_path)
    coco = _load_coco_for(root, list_path)
    records, seen = [], {}
    for n, line in lines:
        try:
            if line in seen:
                raise DataError(list_path, f"line {n}: {line!r} is a duplicate of line {seen[line]}")
            seen[line] = n
            records.append(_record(root, line, n, list_path, coco, decode))
        except DataError as exc:
            log.report(exc)
    return records

"""Tables for the data chapter: records and boxes as pandas frames (one row per image / per box)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .data.records import Record

__all__ = ["records_frame", "boxes_frame"]


def records_frame(records: Iterable[Record], split: str | None = None):
    """One row per image: ``image, label, n_boxes, width, height, split``."""
    import pandas as pd

    return pd.DataFrame([{"image": r.image, "label": r.label, "n_boxes": len(r.boxes), "width": r.width,
                          "height": r.height, "split": split} for r in records])


def boxes_frame(records: Iterable[Record], split: str | None = None):
    """One row per box, in stored-image pixels and as fractions of the image:
    ``image, category, x1, y1, x2, y2, w, h, cx_frac, cy_frac, area_frac, split``."""
    import pandas as pd

    rows = []
    for r in records:
        for box, cat in zip(r.boxes, r.categories or ("",) * len(r.boxes)):
            x1, y1, x2, y2 = box
            rows.append({"image": r.image, "category": cat, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                         "w": x2 - x1, "h": y2 - y1, "cx_frac": (x1 + x2) / 2 / r.width,
                         "cy_frac": (y1 + y2) / 2 / r.height,
                         "area_frac": (x2 - x1) * (y2 - y1) / (r.width * r.height), "split": split})
    columns = ["image", "category", "x1", "y1", "x2", "y2", "w", "h", "cx_frac", "cy_frac", "area_frac", "split"]
    return pd.DataFrame(rows, columns=columns).astype({c: np.float64 for c in columns[2:-1]})

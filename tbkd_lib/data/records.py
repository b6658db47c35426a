"""The record every reader produces, label schemes, and the skip-or-raise error policy."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import DataError

__all__ = ["Record", "LABELS", "SCHEMES", "class_names", "label_index", "tb_index", "ErrorLog",
           "OnError"]

LABELS = ("healthy", "sick", "tb")
SCHEMES = {"3class": ("healthy", "sick", "tb"), "binary": ("non_tb", "tb")}
OnError = Literal["raise", "skip"]


def class_names(scheme: str) -> tuple[str, ...]:
    """Class names in logit order. TB is always the LAST logit (index ``len - 1``)."""
    try:
        return SCHEMES[scheme]
    except KeyError:
        raise DataError("<config>", f"unknown label scheme {scheme!r}; expected one of {sorted(SCHEMES)}") from None


def label_index(label: str, scheme: str) -> int:
    """Map a record label ("healthy" | "sick" | "tb") to its class index under ``scheme``."""
    if label not in LABELS:
        raise DataError("<record>", f"unknown label {label!r}; expected one of {LABELS}")
    if scheme == "binary":
        return 1 if label == "tb" else 0
    class_names(scheme)
    return LABELS.index(label)


def tb_index(scheme: str) -> int:
    return len(class_names(scheme)) - 1


@dataclass(frozen=True)
class Record:
    """One image of a data set, whatever the on-disk layout.

    ``image``: path relative to the data-set root (posix), e.g. ``imgs/tb/tb0003.png``.
    ``boxes``: xyxy in pixels of the STORED image (512-space for TBX11K), floats.
    ``categories``: one box class name per box (``ActiveTuberculosis``, ...).
    ``width``/``height``: the stored image size in pixels.
    """

    image: str
    path: Path
    label: str
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    categories: tuple[str, ...] = ()
    width: int = 512
    height: int = 512
    source: str = "tbx11k"

    def to_json(self) -> dict:
        return {"image": self.image, "label": self.label,
                "boxes": [[round(float(v), 3) for v in b] for b in self.boxes],
                "categories": list(self.categories)}


@dataclass
class ErrorLog:
    """Collects skipped files under ``on_error="skip"``; raises at once under ``"raise"``."""

    on_error: str = "raise"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        if self.on_error not in ("raise", "skip"):
            raise DataError("<config>", f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def report(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise error
        self.skipped.append((error.path, error.problem))

    def summary(self) -> str:
        if not self.skipped:
            return "skipped 0 files"
        lines = [f"skipped {len(self.skipped)} file(s):"] + [f"  {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)

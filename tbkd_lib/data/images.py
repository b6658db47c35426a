"""Decode one radiograph file into a float image, whatever its format.

Every reader returns the same kind of image: ``float32 (H, W) in [0, 1]``, high = bright (bone white,
lungs dark), as a PA film is displayed. Formats:

- PNG / JPEG (via PIL): 8-bit -> ``/ 255``; 16-bit -> ``/ 65535``, except that 16-bit data whose maximum
  is <= 4095 is taken as 12-bit (``/ 4095``; e.g. Montgomery's 12-bit PNGs); RGB with R = G = B (TBX11K
  stores its gray images so) -> one channel; true colour -> ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``.
- DICOM (routed to :mod:`tbkd_lib.data.dicom`) by extension ``.dcm``/``.dicom`` or by the ``DICM`` magic
  at byte offset 128.

Every failure (missing file, empty file, truncated or corrupt data, a text file named ``.png``) raises
:class:`~tbkd_lib.errors.DataError` naming the file and what was expected; PIL and OS errors never
escape. PIL sniffs content, so JPEG bytes in a file named ``.png`` are read fine.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

__all__ = ["read_image", "read_image_uint8_resized", "image_size", "probe_image", "is_dicom", "to_uint8",
           "DICOM_EXTENSIONS"]

DICOM_EXTENSIONS = (".dcm", ".dicom")
_EXPECTED = "expected a PNG, JPEG or DICOM image"
_PIL_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError,
               Image.DecompressionBombError)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_dicom(path: str | os.PathLike) -> bool:
    """True if ``path`` has a DICOM extension or carries ``DICM`` at byte offset 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _why(exc: BaseException) -> str:
    """A short reason for a PIL failure (PIL's own message repeats the path)."""
    if isinstance(exc, UnidentifiedImageError):
        return "content is not a recognised image format"
    return f"{type(exc).__name__}: {exc}"


def _check_file(path: Path) -> None:
    """Raise a precise DataError for a missing, non-regular or empty file."""
    if not path.exists():
        raise DataError(path, f"file not found; {_EXPECTED}")
    if not path.is_file():
        raise DataError(path, f"not a regular file; {_EXPECTED}")
    if path.stat().st_size == 0:
        raise DataError(path, f"empty file (0 bytes); {_EXPECTED}")


def _pil_to_float(img: Image.Image, path: Path) -> np.ndarray:
    """Convert a decoded PIL image to ``float32 (H, W) in [0, 1]`` (see the module docstring)."""
    mode = img.mode
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(img.getchannel(0), dtype=np.float32) / 255.0
    if mode in ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        img, mode = img.convert("RGB"), "RGB"
    if mode == "RGB":
        rgb = np.asarray(img)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0].astype(np.float32) / 255.0
        return (rgb.astype(np.float32) @ _LUMA) / 255.0
    if mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I" (16-bit PNGs decode to these)
        values = np.asarray(img).astype(np.float32)
        if values.size and values.min() < 0:
            raise DataError(path, f"negative pixel values in a {mode} image; expected unsigned 8/16-bit data")
        peak = float(values.max()) if values.size else 0.0
        scale = 4095.0 if peak <= 4095 else 65535.0
        return np.clip(values / scale, 0.0, 1.0)
    if mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    raise DataError(path, f"unsupported PIL image mode {mode!r}; expected gray or RGB, 8 or 16 bit")


def _read_pil(path: Path) -> np.ndarray:
    """Fully decode a PIL-readable image (``load()`` inside the try so truncation fails here)."""
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_float(img, path)
    except DataError:
        raise
    except _PIL_ERRORS as exc:
        raise DataError(path, f"cannot decode image ({_why(exc)}); {_EXPECTED}") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG, JPEG or DICOM file.

    Returns ``float32 (H, W) in [0, 1]``, high = bright. Raises ``DataError`` on any failure.
    """
    path = Path(path)
    _check_file(path)
    if is_dicom(path):
        from .dicom import read_dicom

        return read_dicom(path)
    return _read_pil(path)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the file header only (cheap: no pixel decode). Raises ``DataError``."""
    path = Path(path)
    _check_file(path)
    if is_dicom(path):
        from .dicom import dicom_size

        return dicom_size(path)
    try:
        with Image.open(path) as img:
            return int(img.width), int(img.height)
    except _PIL_ERRORS as exc:
        raise DataError(path, f"cannot read image header ({_why(exc)}); {_EXPECTED}") from None


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``float (H, W) in [0, 1]`` -> ``uint8 (H, W)`` by rounding (values outside [0, 1] are clipped)."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def read_image_uint8_resized(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read ``path`` and resize it to a square ``uint8 (size, size)`` (the image cache's unit).

    Resizing is PIL bilinear on the float image (PIL widens the filter when shrinking, i.e. it
    antialiases); the aspect ratio is NOT kept, so boxes scale per axis (see ``boxes_to_size``).
    """
    size = int(size)
    if size < 1:
        raise DataError(path, f"resize target must be a positive size, got {size}")
    image = read_image(path)
    if image.shape != (size, size):
        pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))  # mode "F"
        image = np.asarray(pil.resize((size, size), Image.BILINEAR))
    return to_uint8(image)


def probe_image(path: str | os.PathLike, decode: bool = False) -> tuple[int, int]:
    """``(width, height)`` of a stored image, checking it on the way.

    ``decode=False`` reads the header only (catches missing, empty and non-image files);
    ``decode=True`` decodes every pixel as well (also catches truncated or corrupt data; slower).
    """
    if decode:
        image = read_image(path)
        return int(image.shape[1]), int(image.shape[0])
    return image_size(path)

"""Read a DICOM radiograph into the same kind of image a PNG gives: ``float32 (H, W) in [0, 1]``.

Pipeline (DICOM PS3.3 C.11 order): stored values -> Modality LUT (Rescale Slope/Intercept or a Modality
LUT Sequence) -> VOI LUT Sequence, else Window Center/Width -> min-max to [0, 1] -> MONOCHROME1 inverted
(``1 - x``), so that high = bright bone and the lungs are dark, as in a PNG chest film. Any Bits
Stored. Colour DICOMs (3 samples) become ITU-R 601 luma without windowing. Multi-frame files are refused.
"""
from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pragma: no cover - pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

__all__ = ["read_dicom", "dicom_size"]

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# What pydicom raises on corrupt bytes. It parses elements lazily, so these come from ``dcmread`` AND from
# any later attribute access (``ds.Rows``, ``ds.get(...)``); both readers below turn them into DataError.
_CORRUPT = (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, OverflowError, struct.error,
            NotImplementedError)


def _corrupt_to_data_error(reader):
    @functools.wraps(reader)
    def wrapper(path, *args, **kwargs):
        from pydicom.errors import BytesLengthException, InvalidDicomError

        try:
            return reader(path, *args, **kwargs)
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(path, "file not found; expected a DICOM file") from None
        except (InvalidDicomError, BytesLengthException, *_CORRUPT) as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise DataError(path, f"not a readable DICOM file ({type(exc).__name__}: {first})") from None
    return wrapper


def _dcmread(path: Path, header_only: bool = False):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=header_only)


@_corrupt_to_data_error
def dicom_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` = (Columns, Rows) from the header, without decoding pixels."""
    path = Path(path)
    ds = _dcmread(path, header_only=True)
    try:
        return int(ds.Columns), int(ds.Rows)
    except AttributeError:
        raise DataError(path, "no (0028,0010) Rows / (0028,0011) Columns; expected an image DICOM") from None


def _pixels(ds, path: Path) -> np.ndarray:
    """Decoded stored values, ``(H, W)`` or ``(H, W, 3)``; DataError when absent or undecodable."""
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DataError(path, "no pixel data element (7FE0,0010); expected a DICOM image")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DataError(path, f"{ds.NumberOfFrames} frames; expected a single-frame radiograph")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types (missing decoder plugin, bad length, ...)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(path, f"cannot decode pixel data (transfer syntax {syntax}; "
                              f"{type(exc).__name__}: {exc})") from None
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise DataError(path, f"pixel array of shape {arr.shape}; expected (rows, columns) gray or RGB")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # Float Pixel Data: one NaN would blank the image
        raise DataError(path, f"{int((~np.isfinite(arr)).sum())} non-finite pixel value(s) (NaN/inf) in float "
                              "pixel data; expected finite values")
    return arr


def _grayscale(arr: np.ndarray, ds, path: Path) -> np.ndarray:
    """Modality LUT then VOI LUT / windowing; returns float64 (H, W), before min-max."""
    try:
        values = apply_modality_lut(arr, ds)
        values = apply_voi_lut(values, ds, index=0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise DataError(path, f"invalid Modality/VOI LUT or window ({type(exc).__name__}: {exc})") from None
    return np.asarray(values, dtype=np.float64)


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


@_corrupt_to_data_error
def read_dicom(path: str | os.PathLike) -> np.ndarray:
    """Read a DICOM radiograph.

    Returns ``float32 (H, W) in [0, 1]`` with high = bright (MONOCHROME1 is inverted). Raises
    ``DataError`` for a missing/unreadable file, missing pixel data, multi-frame data or a bad LUT.
    """
    path = Path(path)
    ds = _dcmread(path)
    arr = _pixels(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:
        luma = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return _min_max(luma)
    image = _min_max(_grayscale(arr, ds, path))
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image

"""A PyTorch dataset of chest X-rays with boxes, an image cache, and the collate function.

Item (``CXRDataset[i]``)::

    {"image": float32 (1, S, S) in [0, 1], "label": int64 (), "boxes": float32 (K, 4) xyxy in S-space,
     "index": i}

- Images are resized to a square ``S x S`` (aspect ratio not kept), so boxes scale per axis from the
  STORED image size: ``x_S = x * S / width`` (no further -1; the -1 of the official converter is already
  in the record). Boxes are clipped to ``[0, S]``.
- Augmentation (``augment=True``, train only) uses ``torchvision.transforms.v2`` on ``tv_tensors.Image``
  + ``tv_tensors.BoundingBoxes`` so that boxes follow every geometric step: RandomAffine (+-5 deg,
  translate 5 %, scale 0.9-1.1), brightness/contrast jitter, and NO horizontal flip unless
  ``hflip=True`` (chest anatomy is not mirror-symmetric: heart on the left). Boxes are then clipped to
  the image and degenerate ones (< 1 px) dropped; the label never changes.
- Randomness derives ONLY from ``(seed, epoch, index)``: each item seeds torch inside
  ``torch.random.fork_rng`` so the global RNG is untouched and results do not depend on the number of
  DataLoader workers; a resumed run sees the same augmentations. Call ``set_epoch(e)`` before each
  epoch, and keep ``persistent_workers=False`` (persistent workers hold a stale copy of ``epoch``).
- ``ImageCache`` keeps decoded, resized ``uint8 (S, S)`` images keyed by (absolute path, S, mtime_ns);
  a hit costs one ``os.stat`` and a dict lookup, no PIL. With DataLoader workers each worker process has
  its own copy: call ``cache.warm(...)`` before creating the loader (workers inherit it on fork), or
  give a ``persist_dir`` (one ``.npy`` file per image, written atomically, shared by all processes).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .images import read_image_uint8_resized
from .records import ErrorLog, Record, class_names, label_index

__all__ = ["ImageCache", "CXRDataset", "collate", "boxes_to_size", "build_augment", "item_seed"]


# ------------------------------------------------------------------------------------------ cache
class ImageCache:
    """Decoded, resized images: ``get(path, size) -> uint8 (size, size)``.

    Keyed by ``(absolute path, size, mtime_ns)``: a file rewritten since it was cached is decoded again.
    ``hits`` / ``misses`` count lookups (a miss = one decode, or one ``.npy`` load from ``persist_dir``).
    """

    def __init__(self, persist_dir: str | os.PathLike | None = None):
        self._images: dict[tuple[str, int, int], np.ndarray] = {}
        self._latest: dict[tuple[str, int], int] = {}
        self.persist_dir = Path(persist_dir) if persist_dir is not None else None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._images)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._images.values())

    def clear(self) -> None:
        self._images.clear()
        self._latest.clear()

    def get(self, path: str | os.PathLike, size: int) -> np.ndarray:
        """``uint8 (size, size)`` image of ``path``; decodes on a miss. Raises ``DataError``."""
        path = os.path.abspath(path)
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            raise DataError(path, "file not found; expected a PNG, JPEG or DICOM image") from None
        key = (path, int(size), mtime)
        image = self._images.get(key)
        if image is not None:
            self.hits += 1
            return image
        self.misses += 1
        image = self._load(key)
        self._store(key, image)
        return image

    def warm(self, paths: Iterable[str | os.PathLike], size: int) -> None:
        """Decode every path now (e.g. in the main process, before DataLoader workers fork)."""
        for path in paths:
            self.get(path, size)

    def _store(self, key: tuple[str, int, int], image: np.ndarray) -> None:
        old = self._latest.get(key[:2])
        if old is not None and old != key[2]:
            self._images.pop((key[0], key[1], old), None)
        self._latest[key[:2]] = key[2]
        self._images[key] = image

    def _persist_path(self, key: tuple[str, int, int]) -> Path:
        digest = hashlib.sha1(f"{key[0]}|{key[1]}|{key[2]}".encode()).hexdigest()
        return self.persist_dir / f"{digest}.npy"

    def _load(self, key: tuple[str, int, int]) -> np.ndarray:
        path, size, _ = key
        if self.persist_dir is None:
            return read_image_uint8_resized(path, size)
        file = self._persist_path(key)
        if file.is_file():
            try:
                image = np.load(file)
                if image.shape == (size, size) and image.dtype == np.uint8:
                    return image
            except (OSError, ValueError):
                pass  # unreadable cache file: decode again and overwrite it
        image = read_image_uint8_resized(path, size)
        self._save(file, image)
        return image

    @staticmethod
    def _save(file: Path, image: np.ndarray) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, image)
        os.replace(tmp, file)


# ------------------------------------------------------------------------------------------ boxes
def boxes_to_size(boxes, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """Rescale xyxy ``boxes`` (K, 4) from an image of ``from_hw`` = (H, W) to ``to_hw``.

    Returns ``float32 (K, 4)``: ``x * W_to / W_from``, ``y * H_to / H_from`` (no clipping).
    """
    out = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    scale = torch.tensor([to_hw[1] / from_hw[1], to_hw[0] / from_hw[0]] * 2, dtype=torch.float32)
    return out * scale


def _clip(boxes: torch.Tensor, size: int) -> torch.Tensor:
    return boxes.clamp(min=0.0, max=float(size))


# ------------------------------------------------------------------------------------ augmentation
def build_augment(hflip: bool = False):
    """The training augmentation (a ``transforms.v2.Compose`` over ``{"image", "boxes"}``)."""
    from torchvision.transforms import v2

    ops = [v2.RandomHorizontalFlip(p=0.5)] if hflip else []
    ops += [
        v2.RandomAffine(degrees=5, translate=(0.05, 0.05), scale=(0.9, 1.1),
                        interpolation=v2.InterpolationMode.BILINEAR, fill=0),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=None),
    ]
    return v2.Compose(ops)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, index)``."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------- dataset
class CXRDataset(Dataset):
    """Chest X-ray records as tensors (see the module docstring for the item and augmentation).

    ``records``: list of :class:`Record`; ``image_size``: S; ``scheme``: ``"3class"`` or ``"binary"``;
    ``cache``: an :class:`ImageCache`, ``True`` for a new one, or ``None`` (decode every time);
    ``on_error="skip"`` decodes every image once at construction (through the cache, if any) and drops
    unreadable ones, logged in ``self.errors``; under ``"raise"`` a bad file raises in ``__getitem__``.
    """

    def __init__(self, records: Sequence[Record], image_size: int = 224, scheme: str = "3class",
                 augment: bool = False, cache: ImageCache | bool | None = None, seed: int = 0,
                 on_error: str = "raise", hflip: bool = False):
        self.image_size = int(image_size)
        self.scheme = scheme
        self.class_names = class_names(scheme)
        # (not ``cache or None``: an empty ImageCache has len 0 and is falsy)
        self.cache = ImageCache() if cache is True else (None if cache is None or cache is False else cache)
        self.seed, self.epoch = int(seed), 0
        self.errors = ErrorLog(on_error)
        self.records = list(records)
        if on_error == "skip":
            self.records = [r for r in self.records if self._readable(r)]
        if not self.records:
            raise DataError("<dataset>", f"no records to serve; {self.errors.summary()}")
        self.labels = torch.tensor([label_index(r.label, scheme) for r in self.records], dtype=torch.int64)
        self.transform = build_augment(hflip) if augment else None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before each epoch)."""
        self.epoch = int(epoch)

    def _readable(self, record: Record) -> bool:
        try:
            self._pixels(record)
            return True
        except DataError as exc:
            self.errors.report(exc)
            return False

    def _pixels(self, record: Record) -> np.ndarray:
        if self.cache is not None:
            return self.cache.get(record.path, self.image_size)
        return read_image_uint8_resized(record.path, self.image_size)

    def _augment(self, image: torch.Tensor, boxes: torch.Tensor, index: int):
        from torchvision import tv_tensors

        sample = {"image": tv_tensors.Image(image),
                  "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:])}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, self.epoch, index))
            out = self.transform(sample)
        return out["image"].as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        size = self.image_size
        # uint8 -> float32 / 255 in NumPy: single-threaded, so it never stalls on a busy CPU (torch's
        # intra-op threads do for a 224 x 224 image); same float32 result as torch's .float().div(255).
        image = torch.from_numpy(np.divide(self._pixels(record), 255.0, dtype=np.float32)).unsqueeze_(0)
        boxes = _clip(boxes_to_size(record.boxes, (record.height, record.width), (size, size)), size)
        if self.transform is not None:
            image, boxes = self._augment(image, boxes, index)
            image = image.clamp_(0.0, 1.0)
        return {"image": image.contiguous(), "label": self.labels[index].clone(),
                "boxes": boxes.to(torch.float32).reshape(-1, 4), "index": int(index)}


def collate(batch: Sequence[dict]) -> dict:
    """Stack items: ``images`` float32 (B, 1, S, S), ``labels`` int64 (B,), ``boxes`` list of
    float32 (K_b, 4), ``indices`` int64 (B,)."""
    return {
        "images": torch.stack([item["image"] for item in batch]),
        "labels": torch.stack([item["label"] for item in batch]),
        "boxes": [item["boxes"] for item in batch],
        "indices": torch.tensor([item["index"] for item in batch], dtype=torch.int64),
    }

"""Checkpoints: written atomically, always read with ``torch.load(weights_only=True)``.

A tbkd checkpoint is a dict (the torchvision ``references/classification`` shape)::

    {"model": state_dict, "optimizer": state_dict, "lr_scheduler": state_dict, "scaler": state_dict,
     "epoch": int (last finished epoch, 0-based), "config": JSON-able dict, "model_spec": dict,
     "rng": {"torch", "cuda", "numpy", "python"}, "best_metric": float | None, "kind": "teacher"|"student",
     ...}

Everything in it is a tensor or a plain Python type, so ``weights_only=True`` accepts it; a file that
would need arbitrary classes (and could therefore run code while unpickling) is refused.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_write_bytes

__all__ = ["save_checkpoint", "serialize_checkpoint", "load_checkpoint", "load_model", "get_rng_state", "set_rng_state"]


def serialize_checkpoint(state: dict) -> bytes:
    """``torch.save(state)`` into memory."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Serialise ``state`` with ``torch.save`` to memory, then write it atomically to ``path``."""
    return atomic_write_bytes(path, serialize_checkpoint(state))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load ``path`` with ``weights_only=True``.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated or not a torch
    checkpoint, or when it was refused because unpickling it could execute code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        unsafe = _unsafe_globals(path)
        if unsafe or "GLOBAL" in msg:
            names = ", ".join(unsafe[:3]) or _blocked_name(msg)
            raise CheckpointError(
                f"{path}: refused to load: it references Python callables ({names}) beyond tensors and plain "
                "types, and loading it could execute code. Only load such a file with weights_only=False "
                "if you trust its source."
            ) from None
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint ({_short(msg)})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint "
                              f"({type(exc).__name__}: {_first_line(str(exc))})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (got {type(state).__name__})")
    return state


def _short(msg: str) -> str:
    for line in msg.splitlines():
        if "Unsupported" in line or "error" in line.lower():
            return line.strip()[:200]
    return _first_line(msg)


def _unsafe_globals(path: Path) -> list[str]:
    """Globals a pickle references that ``weights_only`` does not allow, found WITHOUT unpickling.

    Reads the pickle stream (``data.pkl`` inside a zip checkpoint, else the raw file) with
    ``pickletools.genops``, which only decodes opcodes. Used to tell "refused: would run code" from
    "corrupt" when the weights-only unpickler gives up early (e.g. on a protocol-4 FRAME opcode).
    """
    import pickletools
    import zipfile

    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # pragma: no cover - private API moved
        allowed = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                data = zf.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    found, strings = [], []
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # truncated or not a pickle: report what was seen before
        pass
    return [g for g in dict.fromkeys(found) if g not in allowed]


def _first_line(msg: str) -> str:
    return (msg.strip().splitlines() or [""])[0][:200]


def _blocked_name(msg: str) -> str:
    """The callable torch's weights-only unpickler refused, e.g. ``io.open`` (not torch's advice to
    allow-list it, which is the wrong advice for a file that was refused for safety)."""
    match = re.search(r"GLOBAL ([\w.]+)", msg)
    return match.group(1) if match else "a global"


def load_model(path: str | os.PathLike, device="cpu"):
    """Rebuild the network saved in checkpoint ``path``; returns ``(model.eval() on device, checkpoint)``."""
    from .models import build_model

    ckpt = load_checkpoint(path)
    if "model" not in ckpt or "model_spec" not in ckpt:
        raise CheckpointError(f"{path}: not a tbkd checkpoint (expected keys 'model' and 'model_spec'; "
                              f"found {sorted(ckpt)[:8]})")
    spec = ckpt["model_spec"]
    model = build_model(spec["arch"], num_classes=spec["num_classes"], input_mode=spec["input_mode"],
                        cam_layer=spec.get("cam_layer"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match model_spec {spec}: {_first_line(str(exc))}") from None
    return model.to(device).eval(), ckpt


def get_rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states as tensors and plain types (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))

"""Prediction on new images: probabilities, a saliency overlay and predicted boxes per image.

``predict_images(checkpoint, paths, out, method="gradcam", tau=0.5)`` accepts PNG/JPEG/DICOM of any size.
Each image is read as ``float32 (H, W)`` in [0, 1] (DICOM through its VOI LUT, MONOCHROME1 inverted),
resized to the model's training size, classified, and explained for the TB class. The map is upsampled
to the original size for the overlay, and boxes are reported in ORIGINAL pixels. A file that cannot be
read is reported (file and reason) and the others are still processed.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import TbkdError
from .io import atomic_write_text, write_json

__all__ = ["predict_images"]


def _overlay_png(path: Path, image, saliency, boxes, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend is left alone

    from .plotting import overlay_saliency, save_figure, set_style

    set_style()
    h, w = image.shape
    fig = Figure(figsize=(6, 6 * h / w))
    ax = fig.subplots()
    overlay_saliency(image, saliency, pred_boxes=boxes, title=title, ax=ax)
    save_figure(fig, path)


def predict_images(checkpoint, paths: Sequence, out, method: str = "gradcam", tau: float = 0.5,
                   device: str = "auto", display_size: int = 1024) -> dict:
    """Returns ``{"predictions": [...], "errors": [{"image", "error"}], "paths": {...}}`` and writes
    ``out/predictions.json``, ``out/predictions.csv`` and ``out/<stem>_overlay.png`` per image."""
    from .checkpoint import load_model
    from .data import read_image
    from .data.records import class_names
    from .distributed import resolve_device
    from .evaluation import LocalizeConfig, compute_saliency
    from .protocol import boxes_from_masks, normalize_saliency, threshold

    dev = resolve_device(device)  # a GPU that is not there: TbkdError, not a CUDA traceback
    model, ckpt = load_model(checkpoint, device=dev)
    model.eval()
    cfg = ckpt.get("config", {})
    size = int(cfg.get("image_size", 224))
    names = class_names(cfg.get("scheme", "3class"))
    tb = len(names) - 1
    lcfg = LocalizeConfig(methods=(method,))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictions, errors = [], []
    for p in paths:
        p = Path(p)
        try:
            image = read_image(p)
        except TbkdError as exc:
            errors.append({"image": str(p), "error": str(exc)})
            continue
        h, w = image.shape
        x = torch.from_numpy(image)[None, None]
        x_small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x_small = x_small.clamp(0, 1).to(dev)
        with torch.no_grad():
            probs = torch.softmax(model(x_small).float(), 1)[0].cpu()
        sal = compute_saliency(model, x_small, torch.tensor([tb], device=dev), method, lcfg).cpu()
        sal = normalize_saliency(sal)
        scale = min(1.0, display_size / max(h, w))
        dh, dw = max(1, round(h * scale)), max(1, round(w * scale))
        sal_disp = F.interpolate(sal[None], size=(dh, dw), mode="bilinear", align_corners=False)[0]
        img_disp = F.interpolate(x, size=(dh, dw), mode="bilinear", align_corners=False, antialias=True)[0, 0]
        boxes = boxes_from_masks(threshold(sal, tau))[0].float()
        boxes_orig = boxes * torch.tensor([w / size, h / size, w / size, h / size])
        overlay = out / f"{p.stem}_overlay.png"
        title = f"p(TB) = {probs[tb]:.2f}, {method}, boxes at tau = {tau:.2f}"
        _overlay_png(overlay, img_disp.clamp(0, 1), sal_disp[0], boxes_orig * scale, title)
        predictions.append({"image": str(p), "width": w, "height": h,
                            "probabilities": {n: round(float(v), 5) for n, v in zip(names, probs)},
                            "predicted": names[int(probs.argmax())], "p_tb": round(float(probs[tb]), 5),
                            "method": method, "tau": tau,
                            "boxes": [[round(float(v), 1) for v in b] for b in boxes_orig],
                            "overlay": str(overlay)})
    result = {"checkpoint": str(checkpoint), "predictions": predictions, "errors": errors}
    write_json(out / "predictions.json", result)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "predicted", *[f"p_{n}" for n in names], "n_boxes", "overlay"])
    for pr in predictions:
        writer.writerow([pr["image"], pr["predicted"], *pr["probabilities"].values(), len(pr["boxes"]), pr["overlay"]])
    atomic_write_text(out / "predictions.csv", buf.getvalue())
    return result

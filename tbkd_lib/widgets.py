"""The interactive explorer: pick an image, a method, a model, ``tau`` and the overlay opacity.

All computation lives here; the notebook only calls :func:`explorer`. ``Explorer.explain`` computes
(and caches) one model's map for one image and method; ``Explorer.view`` thresholds it at ``tau`` and
scores it, and ``Explorer.plot`` draws the result. The same functions make the static figure the
rendered book shows next to the widget.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Explorer", "ExplorerView", "explorer"]


@dataclass(frozen=True)
class ExplorerView:
    """One explained image: ``image (H, W)``, ``saliency_norm (H, W)`` in [0, 1], ``mask`` bool (H, W),
    ``pred_boxes (K, 4)``, ``gt_boxes (G, 4)``, ``iou`` (mask vs union of GT boxes), ``p_tb``."""

    name: str
    image: torch.Tensor
    saliency_norm: torch.Tensor
    mask: torch.Tensor
    pred_boxes: torch.Tensor
    gt_boxes: torch.Tensor
    iou: float
    p_tb: float
    tau: float
    method: str
    model: str


class Explorer:
    """Models of a run directory (``teacher``, ``student``) and the scored val TB images. Maps use
    ``localize_config``, else the run's own (``report.json``), else :class:`LocalizeConfig` defaults."""

    def __init__(self, run_dir, data_root, image_size: int | None = None, max_images: int = 24,
                 device="cpu", localize_config=None):
        from .checkpoint import load_model
        from .data import load_records
        from .evaluation import LocalizeConfig
        from .io import read_json
        from .pipeline import localization_inputs, run_localize_config

        run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.models = {}
        for kind in ("teacher", "student"):
            path = run_dir / kind / "best.pt"
            if path.exists():
                model, ckpt = load_model(path, device=self.device)
                model.eval()
                self.models[kind] = model
                image_size = image_size or int(ckpt["config"]["image_size"])
        if not self.models:
            raise FileNotFoundError(f"{run_dir}: no teacher/best.pt or student/best.pt; train first")
        if localize_config is None and (run_dir / "report.json").exists():
            # the run's own scoring config, so maps (and the taus tuned for them) match the report
            localize_config = run_localize_config(read_json(run_dir / "report.json"))
        self.cfg = localize_config or LocalizeConfig()
        records = load_records(data_root, "val")
        self.images, self.boxes, self.records = localization_inputs(records, image_size, max_images)
        self._cache: dict = {}

    @property
    def names(self) -> list[str]:
        return [Path(r.image).name for r in self.records]

    def explain(self, index: int, method: str, model: str) -> tuple[torch.Tensor, float]:
        """Normalised map ``(H, W)`` of the TB logit and p(TB) for image ``index`` (cached)."""
        from .evaluation import compute_saliency
        from .protocol import normalize_saliency

        key = (index, method, model)
        if key not in self._cache:
            net = self.models[model]
            x = self.images[index:index + 1].to(self.device)
            tb = net.spec["num_classes"] - 1
            with torch.no_grad():
                p_tb = float(torch.softmax(net(x).float(), 1)[0, tb])
            sal = compute_saliency(net, x, torch.tensor([tb], device=self.device), method, self.cfg)
            self._cache[key] = (normalize_saliency(sal)[0].cpu(), p_tb)
        return self._cache[key]

    def view(self, index: int, method: str = "gradcam", model: str = "student", tau: float = 0.5) -> ExplorerView:
        from .locmetrics import mask_iou
        from .protocol import boxes_from_masks, gt_masks_from_boxes, threshold

        sal, p_tb = self.explain(index, method, model)
        mask = threshold(sal[None], float(tau))
        h, w = sal.shape
        gt = gt_masks_from_boxes([self.boxes[index]], h, w)
        return ExplorerView(self.names[index], self.images[index, 0], sal, mask[0],
                            boxes_from_masks(mask)[0], self.boxes[index], float(mask_iou(mask, gt)[0]),
                            p_tb, float(tau), method, model)

    @staticmethod
    def plot(view: ExplorerView, alpha: float = 0.45, ax=None):
        """Overlay with GT (green) and predicted (orange) boxes; IoU, p(TB) and tau in the title."""
        from .plotting import overlay_saliency

        return overlay_saliency(view.image, view.saliency_norm, view.gt_boxes, view.pred_boxes, alpha=alpha,
                                tau=view.tau, title=f"{view.model} {view.method}: IoU {view.iou:.2f}, "
                                                    f"p(TB) {view.p_tb:.2f}\n", ax=ax)


def explorer(ex: Explorer, methods=None, dpi: int = 80):
    """An ``ipywidgets`` panel over ``ex``: image, method, model, tau, opacity → an overlay PNG.

    Each change redraws the overlay into an off-screen matplotlib ``Figure`` and sets it as the
    value of an ``ipywidgets.Image``; nothing is printed into an ``Output`` widget. That matters for
    headless runs: capturing a figure into an ``Output`` widget (what ``interact`` does) makes
    nbclient — under papermill and Jupyter Book — hang now and then with the kernel idle (a book build
    hung here in this chapter twice; jupyter/nbclient#312 reports the same). Returns the panel
    (``panel.controls``: the five controls by name, ``panel.image``: the Image widget).
    """
    import io

    import ipywidgets as W
    from matplotlib.figure import Figure

    methods = list(methods or ex.cfg.methods)
    controls = {
        "index": W.Dropdown(options=[(n, i) for i, n in enumerate(ex.names)], value=0, description="image"),
        "method": W.Dropdown(options=methods, value=methods[0], description="method"),
        "model": W.ToggleButtons(options=list(ex.models), value=list(ex.models)[-1], description="model"),
        "tau": W.FloatSlider(value=0.5, min=0.05, max=0.95, step=0.05, description="tau"),
        "alpha": W.FloatSlider(value=0.45, min=0.0, max=1.0, step=0.05, description="opacity"),
    }
    image = W.Image(format="png")

    def render(_change=None):
        v = {k: w.value for k, w in controls.items()}
        fig = Figure(figsize=(5.5, 5.5))
        ex.plot(ex.view(v["index"], v["method"], v["model"], v["tau"]), alpha=v["alpha"], ax=fig.subplots())
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        image.value = buf.getvalue()

    for w in controls.values():
        w.observe(render, names="value")
    render()
    panel = W.HBox([W.VBox(list(controls.values())), image])
    panel.controls, panel.image = controls, image
    return panel

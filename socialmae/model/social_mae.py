"""Social-MAE: the shared encoder, the pretraining autoencoder and the fine-tuning classifier.

Parameter names follow the released checkpoints (``blocks_a.0.attn.qkv.weight``...), so
:mod:`socialmae.checkpoints` only reshapes the tokenizer kernels and reorders video positions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import torch
import torch.utils.checkpoint
from torch import nn

from socialmae.losses import (
    LossWeights,
    contrastive_loss,
    masked_reconstruction_loss,
    total_loss,
)
from socialmae.model.config import MODES, Mode, SocialMAEConfig, get_preset
from socialmae.model.layers import (
    Block,
    freeze_modality_norms,
    patchify_audio,
    patchify_video,
    reference_video_token_index,
    sincos_2d,
    sincos_3d,
    unpatchify_audio,
    unpatchify_video,
)
from socialmae.model.masking import (
    AudioMaskMode,
    Generators,
    Masked,
    random_masking,
    structured_audio_masking,
    unshuffle,
)
from socialmae.model.pretrained import CONFIG_NAME, WEIGHTS_NAME, read_pretrained, write_pretrained
from socialmae.state_dicts import CheckpointError, load_strict

Task = Literal["classification", "regression"]


@dataclass
class EncoderFeatures:
    """Encoder output for one mode."""

    tokens: torch.Tensor  # [B, N, D] after the final norm (N = 512 + 784, 512 or 784)
    pooled: torch.Tensor  # [B, D] mean over tokens


@dataclass
class PretrainOutput:
    """Losses and predictions of one pretraining forward pass."""

    loss: torch.Tensor  # scalar, weighted total
    loss_mae_audio: torch.Tensor  # scalar
    loss_mae_video: torch.Tensor  # scalar
    loss_contrastive: torch.Tensor  # scalar
    contrastive_accuracy: torch.Tensor  # scalar in [0, 1]
    pred_audio: torch.Tensor | None  # [B, La, p*p] (None when the MAE weight is 0)
    pred_video: torch.Tensor | None  # [B, Lv, s*p*p*C]
    mask_audio: torch.Tensor  # [B, La] 1 = removed
    mask_video: torch.Tensor  # [B, Lv]


@dataclass
class Reconstruction:
    """Inputs, their masked versions and the reconstructions, in the input layouts."""

    audio: torch.Tensor  # [B, T, F]
    audio_masked: torch.Tensor  # [B, T, F] removed patches set to 0
    audio_reconstructed: torch.Tensor  # [B, T, F] visible patches kept, removed ones predicted
    video: torch.Tensor  # [B, C, T, H, W]
    video_masked: torch.Tensor
    video_reconstructed: torch.Tensor


class PatchEmbed(nn.Module):
    """Linear projection of flattened patches (equivalent to a stride = kernel convolution)."""

    def __init__(self, patch_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, embed_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, L, P]`` -> ``[B, L, D]``."""
        return self.proj(patches)


class SocialMAEEncoder(nn.Module):
    """Tokenizers, 11+11 modality-specific blocks, the shared joint block and final norms."""

    def __init__(self, config: SocialMAEConfig) -> None:
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.patch_embed_a = PatchEmbed(c.audio_patch_dim, d)
        self.patch_embed_v = PatchEmbed(c.video_patch_dim, d)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, d))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, d))
        trainable = c.trainable_pos_embed
        self.pos_embed_a = nn.Parameter(torch.zeros(1, c.num_audio_tokens, d), trainable)
        self.pos_embed_v = nn.Parameter(torch.zeros(1, c.num_video_tokens, d), trainable)

        def blocks(depth: int) -> nn.ModuleList:
            return nn.ModuleList(
                Block(d, c.num_heads, c.mlp_ratio, c.norm_eps, c.use_sdpa) for _ in range(depth)
            )

        self.blocks_a = blocks(c.modality_depth)
        self.blocks_v = blocks(c.modality_depth)
        self.blocks_u = blocks(c.joint_depth)
        freeze_modality_norms(self.blocks_a)
        freeze_modality_norms(self.blocks_v)
        self.norm_a = nn.LayerNorm(d, eps=c.norm_eps)
        self.norm_v = nn.LayerNorm(d, eps=c.norm_eps)
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        if type(self) is SocialMAEEncoder:
            self.init_weights()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Self:
        """Build a freshly initialised model from a named preset (see ``PRESETS``)."""
        return cls(get_preset(name, **overrides))

    def init_weights(self) -> None:
        """MAE initialisation: sin-cos positions, xavier Linear, N(0, 0.02) tokens."""
        c = self.config
        with torch.no_grad():
            self.pos_embed_a.copy_(sincos_2d(c.embed_dim, *c.audio_grid)[None])
            self.pos_embed_v.copy_(sincos_3d(c.embed_dim, *c.video_grid)[None])
            for name, param in self.named_parameters():
                if name.startswith(("modality_", "mask_token", "decoder_modality_")):
                    nn.init.normal_(param, std=0.02)
        self.apply(_init_module)

    def set_sdpa(self, enabled: bool) -> None:
        """Switch every attention layer between SDPA and the manual path."""
        for module in self.modules():
            if hasattr(module, "use_sdpa"):
                module.use_sdpa = enabled

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` and ``config.json`` to ``directory`` (atomically)."""
        return write_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> Self:
        """Load a directory written by :meth:`save_pretrained` (strict, eval mode); called
        on :class:`SocialMAEEncoder` it returns whichever model the directory holds.

        Raises:
            CheckpointError: missing or unreadable files, or weights that do not fit.
            TypeError: the directory holds another model than ``cls``.
        """
        meta, sd = read_pretrained(directory)
        model = build_from_meta(meta, directory)
        if not isinstance(model, cls):
            raise TypeError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        load_strict(model, sd, Path(directory) / WEIGHTS_NAME)
        return model.eval()

    def architecture(self) -> dict[str, Any]:
        """What ``config.json`` records besides the model config."""
        return {"architecture": type(self).__name__}

    # ---------------------------------------------------------------- tokenizers

    def _check(self, audio: torch.Tensor | None, video: torch.Tensor | None) -> None:
        c = self.config
        if audio is not None and tuple(audio.shape[1:]) != (c.audio_length, c.num_mel_bins):
            raise ValueError(
                f"audio must be [B, {c.audio_length}, {c.num_mel_bins}] (time, mel), "
                f"got {list(audio.shape)}"
            )
        expected = (c.in_chans, c.num_frames, c.image_size, c.image_size)
        if video is not None and tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"video must be [B, {', '.join(map(str, expected))}] (C, T, H, W), "
                f"got {list(video.shape)}"
            )
        if audio is not None and video is not None and audio.shape[0] != video.shape[0]:
            raise ValueError(f"batch sizes differ: audio {audio.shape[0]}, video {video.shape[0]}")

    def tokenize_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, 1024, 128]`` fbank -> ``[B, 512, D]`` tokens with positions and modality."""
        self._check(audio, None)
        x = self.patch_embed_a(patchify_audio(audio, self.config.patch_size))  # [B, La, D]
        return x + self.pos_embed_a + self.modality_a

    def video_input(self, video: torch.Tensor) -> torch.Tensor:
        """What the model sees of ``video`` ``[B, 3, T, H, W]`` (same shape): the frames, or with
        ``config.video_centering_gain`` g their motion, ``g * (video - mean over T)``."""
        gain = self.config.video_centering_gain
        if gain is None:
            return video
        return (video - video.mean(dim=2, keepdim=True)) * gain

    def tokenize_video(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, 224, 224]`` -> ``[B, Lv, D]`` tokens with positions and modality."""
        self._check(None, video)
        c = self.config
        patches = patchify_video(self.video_input(video), c.tubelet_size, c.patch_size)
        x = self.patch_embed_v(patches)  # [B, Lv, D]
        return x + self.pos_embed_v + self.modality_v

    # ---------------------------------------------------------------- encoder stages

    def _run(
        self, blocks: nn.ModuleList, x: torch.Tensor, modality: Literal["a", "v"] | None = None
    ) -> torch.Tensor:
        """``blocks`` over ``x`` ``[B, N, D]``; with activation checkpointing for this group of
        blocks (``config.activation_checkpointing``), each block's activations are recomputed in
        backward instead of kept (same results: the blocks hold no randomness)."""
        group = "decoder" if blocks is getattr(self, "decoder_blocks", None) else "encoder"
        recompute = self.config.activation_checkpointing in (group, "all") and (
            torch.is_grad_enabled() and x.requires_grad
        )
        for block in blocks:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, modality, use_reentrant=False)
            else:
                x = block(x, modality)
        return x

    def encode_joint(self, audio_tokens: torch.Tensor, video_tokens: torch.Tensor) -> torch.Tensor:
        """Modality blocks, then the joint block(s) on ``[audio | video]`` and ``norm``.

        ``[B, Na, D]``, ``[B, Nv, D]`` -> ``[B, Na + Nv, D]``.
        """
        a = self._run(self.blocks_a, audio_tokens)
        v = self._run(self.blocks_v, video_tokens)
        return self.norm(self._run(self.blocks_u, torch.cat([a, v], dim=1)))

    def features(
        self, audio: torch.Tensor | None, video: torch.Tensor | None, mode: Mode = "multimodal"
    ) -> EncoderFeatures:
        """Unmasked encoder features.

        Args:
            audio: ``[B, 1024, 128]`` (may be None in ``video`` mode).
            video: ``[B, 3, T, 224, 224]`` (may be None in ``audio`` mode).
            mode: ``multimodal`` (joint norms, ``norm``), ``audio`` (``_a`` norms, ``norm_a``)
                or ``video`` (``_v`` norms, ``norm_v``).
        """
        if mode == "multimodal":
            if audio is None or video is None:
                raise ValueError("multimodal mode needs both audio and video")
            self._check(audio, video)
            tokens = self.encode_joint(self.tokenize_audio(audio), self.tokenize_video(video))
        elif mode == "audio":
            if audio is None:
                raise ValueError("audio mode needs audio")
            a = self._run(self.blocks_a, self.tokenize_audio(audio))
            tokens = self.norm_a(self._run(self.blocks_u, a, "a"))
        elif mode == "video":
            if video is None:
                raise ValueError("video mode needs video")
            v = self._run(self.blocks_v, self.tokenize_video(video))
            tokens = self.norm_v(self._run(self.blocks_u, v, "v"))
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return EncoderFeatures(tokens=tokens, pooled=tokens.mean(dim=1))

    def embed(
        self, audio: torch.Tensor | None, video: torch.Tensor | None, mode: Mode = "multimodal"
    ) -> torch.Tensor:
        """Pooled embedding ``[B, D]`` for ``mode`` (see :meth:`features`)."""
        return self.features(audio, video, mode).pooled


class SocialMAE(SocialMAEEncoder):
    """The pretraining model: masked encoder, joint decoder, reconstruction + contrastive."""

    def __init__(self, config: SocialMAEConfig) -> None:
        super().__init__(config)
        c = config
        dd = c.decoder_embed_dim
        self.decoder_embed = nn.Linear(c.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, dd))
        trainable = c.trainable_pos_embed
        self.decoder_pos_embed_a = nn.Parameter(torch.zeros(1, c.num_audio_tokens, dd), trainable)
        self.decoder_pos_embed_v = nn.Parameter(torch.zeros(1, c.num_video_tokens, dd), trainable)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, c.decoder_num_heads, c.mlp_ratio, c.norm_eps, c.use_sdpa)
            for _ in range(c.decoder_depth)
        )
        freeze_modality_norms(self.decoder_blocks)
        self.decoder_norm = nn.LayerNorm(dd, eps=c.norm_eps)
        self.decoder_pred_a = nn.Linear(dd, c.audio_patch_dim)
        self.decoder_pred_v = nn.Linear(dd, c.video_patch_dim)
        self.register_buffer(
            "legacy_video_target_index", reference_video_token_index(c.video_grid), persistent=False
        )
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        c = self.config
        with torch.no_grad():
            self.decoder_pos_embed_a.copy_(sincos_2d(c.decoder_embed_dim, *c.audio_grid)[None])
            self.decoder_pos_embed_v.copy_(sincos_3d(c.decoder_embed_dim, *c.video_grid)[None])

    # ---------------------------------------------------------------- targets

    def audio_target(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, 1024, 128]`` -> ``[B, 512, 256]`` patches in token order."""
        return patchify_audio(audio, self.config.patch_size)

    def video_target(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, 224, 224]`` -> ``[B, Lv, s*p*p*3]`` patches in token order.

        The patches are those of :meth:`video_input`; with ``legacy_target_order`` they are
        permuted the way the reference scored them.
        """
        c = self.config
        target = patchify_video(self.video_input(video), c.tubelet_size, c.patch_size)
        if c.legacy_target_order:
            target = target[:, self.legacy_video_target_index]
        return target

    # ---------------------------------------------------------------- passes

    def forward_encoder(
        self,
        audio: torch.Tensor,
        video: torch.Tensor,
        mask_ratio_audio: float,
        mask_ratio_video: float,
        audio_mask_mode: AudioMaskMode = "unstructured",
        generator: Generators = None,
    ) -> tuple[torch.Tensor, Masked, Masked, torch.Tensor, torch.Tensor]:
        """Mask and encode.

        Returns:
            joint ``[B, Ka + Kv, D]`` (visible tokens, after ``norm``), audio and video
            :class:`Masked`, unimodal ``[B, Ka, D]`` (``norm_a``) and ``[B, Kv, D]`` (``norm_v``).
        """
        self._check(audio, video)
        c = self.config
        masked_a = structured_audio_masking(
            self.tokenize_audio(audio), mask_ratio_audio, c.audio_grid, audio_mask_mode, generator
        )
        masked_v = random_masking(self.tokenize_video(video), mask_ratio_video, generator)
        a = self._run(self.blocks_a, masked_a.visible)  # [B, Ka, D]
        v = self._run(self.blocks_v, masked_v.visible)  # [B, Kv, D]
        joint = self.norm(self._run(self.blocks_u, torch.cat([a, v], dim=1)))
        uni_a = self.norm_a(self._run(self.blocks_u, a, "a"))
        uni_v = self.norm_v(self._run(self.blocks_u, v, "v"))
        return joint, masked_a, masked_v, uni_a, uni_v

    def forward_decoder(
        self, joint: torch.Tensor, masked_a: Masked, masked_v: Masked
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, Ka + Kv, D]`` -> predictions ``[B, La, p*p]`` and ``[B, Lv, s*p*p*C]``."""
        x = self.decoder_embed(joint)  # [B, Ka + Kv, Dd]
        ka = masked_a.visible.shape[1]
        a = unshuffle(x[:, :ka], masked_a.ids_restore, self.mask_token)  # [B, La, Dd]
        v = unshuffle(x[:, ka:], masked_v.ids_restore, self.mask_token)  # [B, Lv, Dd]
        a = a + self.decoder_pos_embed_a + self.decoder_modality_a
        v = v + self.decoder_pos_embed_v + self.decoder_modality_v
        x = self.decoder_norm(self._run(self.decoder_blocks, torch.cat([a, v], dim=1)))
        la = a.shape[1]
        return self.decoder_pred_a(x[:, :la]), self.decoder_pred_v(x[:, la:])

    def forward(
        self,
        audio: torch.Tensor,
        video: torch.Tensor,
        mask_ratio_audio: float = 0.75,
        mask_ratio_video: float = 0.75,
        weights: LossWeights | None = None,
        audio_mask_mode: AudioMaskMode = "unstructured",
        generator: Generators = None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> PretrainOutput:
        """One pretraining pass.

        Args:
            audio: ``[B, 1024, 128]`` normalised fbank; video: ``[B, 3, T, 224, 224]``.
            weights: loss weights (default: the paper's, 1.0 and 0.01); a zero weight skips
                that branch (no decoder pass, or no contrastive pass).
            generator: source of the masking noise (one, or one per sample), for
                reproducible masks.
            gather: ``[B, D] -> [W*B, D]`` concatenation over data-parallel ranks that keeps
                gradients (:func:`socialmae.train.distributed.gather_with_grad`): the
                contrastive loss then sees the global batch, as a single process would.
        """
        weights = weights or LossWeights()
        joint, masked_a, masked_v, uni_a, uni_v = self.forward_encoder(
            audio, video, mask_ratio_audio, mask_ratio_video, audio_mask_mode, generator
        )
        zero = joint.new_zeros((), dtype=torch.float32)
        pred_a = pred_v = None
        loss_a = loss_v = loss_c = acc = zero
        if weights.mae > 0:
            pred_a, pred_v = self.forward_decoder(joint, masked_a, masked_v)
            norm_pix = self.config.norm_pix_loss
            loss_a = masked_reconstruction_loss(
                pred_a, self.audio_target(audio), masked_a.mask, norm_pix
            )
            loss_v = masked_reconstruction_loss(
                pred_v, self.video_target(video), masked_v.mask, norm_pix
            )
        if weights.contrastive > 0:
            pooled_a, pooled_v = uni_a.mean(dim=1), uni_v.mean(dim=1)  # [B, D]
            if gather is not None:
                pooled_a, pooled_v = gather(pooled_a), gather(pooled_v)  # [W*B, D]
            loss_c, acc = contrastive_loss(
                pooled_a, pooled_v, weights.temperature, weights.bidirectional
            )
        return PretrainOutput(
            loss=total_loss(loss_a, loss_v, loss_c, weights),
            loss_mae_audio=loss_a,
            loss_mae_video=loss_v,
            loss_contrastive=loss_c,
            contrastive_accuracy=acc,
            pred_audio=pred_a,
            pred_video=pred_v,
            mask_audio=masked_a.mask,
            mask_video=masked_v.mask,
        )

    @torch.no_grad()
    def reconstruct(
        self,
        audio: torch.Tensor,
        video: torch.Tensor,
        mask_ratio_audio: float = 0.75,
        mask_ratio_video: float = 0.75,
        generator: Generators = None,
    ) -> Reconstruction:
        """Mask, reconstruct, and paste visible patches back (the paper's Fig. 2).

        Predictions of a ``norm_pix_loss`` model are mapped back with each patch's own
        mean and variance. Inputs and outputs use the input layouts; with
        ``config.video_centering_gain`` the video fields hold what the model sees (motion).
        """
        c = self.config
        out = self.forward(
            audio, video, mask_ratio_audio, mask_ratio_video,
            LossWeights(contrastive=0.0), generator=generator,
        )  # fmt: skip
        assert out.pred_audio is not None and out.pred_video is not None

        def merge(target, pred, mask):
            if c.norm_pix_loss:
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                pred = pred * (var + 1e-6) ** 0.5 + mean
            m = mask.unsqueeze(-1)
            return target * (1 - m), target * (1 - m) + pred * m

        video = self.video_input(video)  # what was masked and reconstructed
        ta = patchify_audio(audio, c.patch_size)
        tv = patchify_video(video, c.tubelet_size, c.patch_size)
        a_masked, a_rec = merge(ta, out.pred_audio, out.mask_audio)
        v_masked, v_rec = merge(tv, out.pred_video, out.mask_video)

        def to_audio(tokens):
            return unpatchify_audio(tokens, c.patch_size, c.audio_length)

        def to_video(tokens):
            return unpatchify_video(tokens, c.tubelet_size, c.patch_size, c.video_grid, c.in_chans)

        return Reconstruction(
            audio=audio,
            audio_masked=to_audio(a_masked),
            audio_reconstructed=to_audio(a_rec),
            video=video,
            video_masked=to_video(v_masked),
            video_reconstructed=to_video(v_rec),
        )


class SocialMAEClassifier(SocialMAEEncoder):
    """Fine-tuning model: the encoder, mean pooling and ``mlp_head`` (LayerNorm + Linear).

    ``mode`` is the input mode the head was trained for (multimodal, audio or video); it is
    the default of :meth:`forward` and is saved with the model.
    """

    def __init__(
        self,
        config: SocialMAEConfig,
        num_outputs: int,
        task: Task = "classification",
        labels: tuple[str, ...] | None = None,
        mode: Mode = "multimodal",
    ) -> None:
        super().__init__(config)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode: Mode = mode
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        if labels is not None and len(labels) != num_outputs:
            raise ValueError(f"{len(labels)} labels for {num_outputs} outputs")
        self.num_outputs = num_outputs
        self.task: Task = task
        self.labels = tuple(labels) if labels is not None else None
        self.mlp_head = nn.Sequential(
            nn.LayerNorm(config.embed_dim, eps=config.norm_eps),
            nn.Linear(config.embed_dim, num_outputs),
        )
        self.init_weights()

    @classmethod
    def from_preset(  # type: ignore[override]
        cls,
        name: str,
        num_outputs: int,
        task: Task = "classification",
        labels: tuple[str, ...] | None = None,
        mode: Mode = "multimodal",
        **overrides: Any,
    ) -> Self:
        """A freshly initialised classifier/regressor on a named preset."""
        return cls(get_preset(name, **overrides), num_outputs, task, labels, mode)

    def architecture(self) -> dict[str, Any]:
        return {
            "architecture": type(self).__name__,
            "num_outputs": self.num_outputs,
            "task": self.task,
            "labels": list(self.labels) if self.labels is not None else None,
            "mode": self.mode,
        }

    def forward(
        self, audio: torch.Tensor | None, video: torch.Tensor | None, mode: Mode | None = None
    ) -> torch.Tensor:
        """Logits (or regression outputs) ``[B, num_outputs]``; ``mode`` defaults to the
        trained one."""
        return self.mlp_head(self.embed(audio, video, mode or self.mode))


def _init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_from_meta(
    meta: dict[str, Any], path: str | os.PathLike[str]
) -> SocialMAE | SocialMAEClassifier:
    """The (untrained) model a saved directory's ``config.json`` describes."""
    try:
        config = SocialMAEConfig.from_dict(meta["config"])
        arch = meta["architecture"]
        if arch == "SocialMAE":
            return SocialMAE(config)
        if arch == "SocialMAEClassifier":
            labels = meta.get("labels")
            return SocialMAEClassifier(
                config, int(meta["num_outputs"]), meta.get("task", "classification"),
                tuple(labels) if labels is not None else None, meta.get("mode", "multimodal"),
            )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid {CONFIG_NAME} ({exc})") from exc
    raise CheckpointError(path, f"unknown architecture {arch!r}")

"""Typed model configuration and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["multimodal", "audio", "video"]  # which streams a classifier hears
MODES: tuple[Mode, ...] = ("multimodal", "audio", "video")

ChannelOrder = Literal["RGB", "BGR"]
ActivationCheckpointing = Literal["none", "decoder", "encoder", "all"]


@dataclass(frozen=True)
class SocialMAEConfig:
    """Architecture and preprocessing contract of one Social-MAE / CAV-MAE model.

    Inputs the model expects: audio fbank ``[B, audio_length, num_mel_bins]`` and video
    ``[B, in_chans, num_frames, image_size, image_size]``.
    """

    # Audio tokenizer: fbank [time, mel] seen as a [mel, time] image split into square patches.
    audio_length: int = 1024
    num_mel_bins: int = 128
    # Video tokenizer: tubelets of tubelet_size frames x patch_size x patch_size pixels.
    num_frames: int = 8
    tubelet_size: int = 2
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    # Encoder.
    embed_dim: int = 768
    num_heads: int = 12
    modality_depth: int = 11
    joint_depth: int = 1
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    # Decoder (pretraining only).
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    # Positional embeddings: trained (Social-MAE) or fixed sin-cos (CAV-MAE).
    trainable_pos_embed: bool = True
    # Reconstruction target normalised per patch (CAV-MAE weights: True, Social-MAE: False).
    norm_pix_loss: bool = False
    # Score video predictions against the reference implementation's permuted targets.
    legacy_target_order: bool = False
    # Video as motion: None feeds the frames as they are (the paper). A number g subtracts
    # each clip's mean frame and multiplies the remainder by g before tokenizing (pretraining
    # reconstructs the same): a face's appearance, which identifies the speaker, is removed
    # and its motion (expressions, speech) kept. Needs more than one frame.
    video_centering_gain: float | None = None
    # Attention through F.scaled_dot_product_attention; False selects the manual path.
    use_sdpa: bool = True
    # Recompute block activations in backward instead of storing them: none, decoder (the
    # decoder blocks run over all tokens and hold most of the activations), encoder, or all.
    activation_checkpointing: ActivationCheckpointing = "none"
    # Preprocessing the weights were trained with (read by the data loader).
    fbank_mean: float = -6.2943
    fbank_std: float = 12.26344
    channel_order: ChannelOrder = "RGB"

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"invalid SocialMAEConfig: {what}")

        for name in (
            "audio_length", "num_mel_bins", "num_frames", "tubelet_size", "image_size",
            "patch_size", "in_chans", "embed_dim", "num_heads", "modality_depth",
            "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
        ):  # fmt: skip
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.joint_depth >= 0, f"joint_depth must be >= 0, got {self.joint_depth}")
        need(self.mlp_ratio > 0, f"mlp_ratio must be positive, got {self.mlp_ratio}")
        need(self.fbank_std > 0, f"fbank_std must be positive, got {self.fbank_std}")
        gain = self.video_centering_gain
        need(
            gain is None or (gain > 0 and self.num_frames > 1),
            f"video_centering_gain must be null or > 0 with num_frames > 1, got {gain}",
        )
        need(self.channel_order in ("RGB", "BGR"), f"channel_order is {self.channel_order!r}")
        need(
            self.activation_checkpointing in ("none", "decoder", "encoder", "all"),
            f"activation_checkpointing must be none, decoder, encoder or all, "
            f"got {self.activation_checkpointing!r}",
        )
        for num, den in (
            ("audio_length", "patch_size"), ("num_mel_bins", "patch_size"),
            ("image_size", "patch_size"), ("num_frames", "tubelet_size"),
            ("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads"),
        ):  # fmt: skip
            a, b = getattr(self, num), getattr(self, den)
            need(a % b == 0, f"{num} {a} not divisible by {den} {b}")
        for dim in (self.embed_dim, self.decoder_embed_dim):
            need(dim % 16 == 0, f"widths must be multiples of 16 for sin-cos tables, got {dim}")

    # Derived token grid sizes.
    @property
    def audio_grid(self) -> tuple[int, int]:
        """(frequency rows, time columns) of the audio token grid, e.g. (8, 64)."""
        return self.num_mel_bins // self.patch_size, self.audio_length // self.patch_size

    @property
    def video_grid(self) -> tuple[int, int, int]:
        """(time, height, width) of the video token grid, e.g. (4, 14, 14)."""
        side = self.image_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def num_audio_tokens(self) -> int:
        f, t = self.audio_grid
        return f * t

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.video_grid
        return t * h * w

    @property
    def audio_patch_dim(self) -> int:
        return self.patch_size * self.patch_size

    @property
    def video_patch_dim(self) -> int:
        return self.tubelet_size * self.patch_size * self.patch_size * self.in_chans

    def replace(self, **overrides: Any) -> SocialMAEConfig:
        """A copy with some fields changed; unknown names raise ``TypeError``."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown SocialMAEConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SocialMAEConfig:
        return cls().replace(**data)


_TINY = SocialMAEConfig(
    embed_dim=64,
    num_heads=4,
    modality_depth=2,
    joint_depth=1,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
    mlp_ratio=2.0,
)

PRESETS: dict[str, SocialMAEConfig] = {
    # The paper: 8 face frames, tubelets of 2, trained positional embeddings, raw-pixel targets.
    "social-mae-base": SocialMAEConfig(),
    # CAV-MAE: one frame (196 video tokens), fixed sin-cos positions, normalised targets.
    "cav-mae-base": SocialMAEConfig(
        num_frames=1,
        tubelet_size=1,
        trainable_pos_embed=False,
        norm_pix_loss=True,
        fbank_mean=-5.081,
        fbank_std=4.4849,
    ),
    # A small model with the same input contract that trains on 2 CPU cores in seconds.
    "tiny": _TINY,
    # The offline demo's model: tiny's widths on 112-pixel faces and 3.04 s of audio (the
    # demo's 3 s window), so that pretraining and three fine-tunings fit minutes on 2 cores.
    # Its faces enter as motion (video_centering_gain): with 14 training identities, the raw
    # frames let it memorise who speaks instead of how (README, "The demo").
    "demo": _TINY.replace(audio_length=304, image_size=112, video_centering_gain=4.0),
}


def get_preset(name: str, **overrides: Any) -> SocialMAEConfig:
    """The named preset, optionally with fields overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)

"""Model inputs from decoded media: the Kaldi fbank and normalised face frames.

The constants are the ones the released weights were trained with (see
``SocialMAEConfig.fbank_mean/fbank_std/channel_order``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import torch

from socialmae.data.decode import SAMPLE_RATE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_FRAME_SHIFT, _FRAME_LENGTH = 10.0, 25.0  # milliseconds


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (then restore the count): CPU reductions
    split their work by thread count, so numbers stored for good (shards) are computed with a
    fixed one."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _fbank_constants(
    num_mel_bins: int, sample_rate: int
) -> tuple[int, int, int, torch.Tensor, torch.Tensor]:
    """Kaldi's framing for ``sample_rate`` (shift, window, padded FFT size), its Hanning window
    ``[1, window]`` and its mel filterbank ``[num_mel_bins, fft // 2 + 1]``: what
    ``torchaudio.compliance.kaldi.fbank`` rebuilds on every call."""
    from torchaudio.compliance import kaldi

    shift = int(sample_rate * _FRAME_SHIFT / 1000)
    window = int(sample_rate * _FRAME_LENGTH / 1000)
    padded = 1 if window == 0 else 2 ** (window - 1).bit_length()
    function = kaldi._feature_window_function("hanning", window, 0.42, "cpu", torch.float32)
    banks, _ = kaldi.get_mel_banks(num_mel_bins, padded, float(sample_rate), 20.0, 0.0, 100.0,
                                   -500.0, 1.0)  # fmt: skip
    banks = torch.nn.functional.pad(banks.to(torch.float32), (0, 1), mode="constant", value=0)
    return shift, window, padded, function.unsqueeze(0), banks


def log_mel(
    waveform: np.ndarray | torch.Tensor, num_mel_bins: int = 128, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """Log-mel filterbank as in CAV-MAE / Social-MAE, unpadded and unnormalised: Kaldi's fbank
    (``torchaudio.compliance.kaldi.fbank`` with ``htk_compat``, a Hanning window, no dither,
    10 ms shift), the same operations in the same order (so the same numbers), with the
    window and the filterbank built once.

    Args:
        waveform: ``[N]`` mono samples at ``sample_rate``.
    Returns:
        ``[frames, num_mel_bins]`` (10 ms frames, 25 ms Hanning windows; at least one frame).
    """
    from torchaudio.compliance import kaldi

    wav = torch.as_tensor(waveform, dtype=torch.float32).reshape(1, -1)
    wav = wav - wav.mean()
    shift, window, padded, function, banks = _fbank_constants(num_mel_bins, sample_rate)
    if wav.shape[1] < window:  # kaldi needs one full window
        wav = torch.nn.functional.pad(wav, (0, window - wav.shape[1]))
    frames = kaldi._get_strided(wav[0], window, shift, True)  # [m, window]
    frames = frames - torch.mean(frames, dim=1).unsqueeze(1)  # remove the DC offset
    previous = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    frames = frames - 0.97 * previous[:, :-1]  # pre-emphasis
    frames = frames * function
    frames = torch.nn.functional.pad(
        frames.unsqueeze(0), (0, padded - window), mode="constant", value=0
    ).squeeze(0)  # [m, padded]
    spectrum = torch.fft.rfft(frames).abs().pow(2.0)  # [m, padded // 2 + 1]
    energies = torch.mm(spectrum, banks.T)  # [m, num_mel_bins]
    return torch.max(energies, kaldi._get_epsilon("cpu", torch.float32)).log()


def fbank_framing(sample_rate: int = SAMPLE_RATE) -> tuple[int, int]:
    """``(hop, window)`` of :func:`log_mel` in samples: frame ``i`` covers samples
    ``[i * hop, i * hop + window)``."""
    shift, window, *_ = _fbank_constants(128, sample_rate)
    return shift, window


def pad_frames(feats: torch.Tensor, target_length: int) -> torch.Tensor:
    """``[frames, mel]`` zero-padded (or cut) to ``[target_length, mel]``, as the reference."""
    frames = feats.shape[0]
    if frames < target_length:
        feats = torch.nn.functional.pad(feats, (0, 0, 0, target_length - frames))
    return feats[:target_length]


def fbank(
    waveform: np.ndarray | torch.Tensor,
    num_mel_bins: int = 128,
    target_length: int = 1024,
    sample_rate: int = SAMPLE_RATE,
) -> torch.Tensor:
    """:func:`log_mel` padded or cut to ``[target_length, num_mel_bins]``, unnormalised."""
    return pad_frames(log_mel(waveform, num_mel_bins, sample_rate), target_length)


def normalize_fbank(feats: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(x - mean) / std`` with the dataset statistics of the weights."""
    return (feats - mean) / std


def frames_to_video(
    frames: np.ndarray | torch.Tensor,
    channel_order: str = "RGB",
    size: int | None = None,
    region: tuple[int, int, int] | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Face crops to the model's video layout.

    Args:
        frames: ``[T, H, W, 3]`` RGB uint8.
        channel_order: ``RGB`` or ``BGR`` (the released Social-MAE weights saw BGR frames
            normalised with the RGB ImageNet statistics, as the reference did).
        size: side the model takes; frames of another size are resized (antialiased).
        region: ``(x, y, side)`` square to cut from every frame first (augmentation).
        flip: mirror left-right (augmentation).
    Returns:
        ``[3, T, size, size]`` float32, ImageNet-normalised.
    """
    if channel_order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be RGB or BGR, got {channel_order!r}")
    pixels = torch.as_tensor(np.ascontiguousarray(frames))  # [T, H, W, 3] uint8
    if region is not None:
        x, y, side = region
        pixels = pixels[:, y : y + side, x : x + side]
    if flip:
        pixels = pixels.flip(2)
    if size is not None and pixels.shape[2] != size:
        # [T, 3, H, W] laid out plainly: the antialiased resize is a quarter faster than on the
        # channels-last view, with the same numbers; normalised in place, then [3, T, S, S].
        video = torch.nn.functional.interpolate(
            pixels.permute(0, 3, 1, 2).contiguous().float(), size=(size, size), mode="bilinear",
            antialias=True, align_corners=False,
        )  # fmt: skip
        video = video.div_(255.0)
        if channel_order == "BGR":
            video = video.flip(1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return video.sub_(mean).div_(std).permute(1, 0, 2, 3).contiguous()
    # the bytes straight into the model's layout, one channel at a time (half the passes of a
    # layout change, a float copy and broadcast arithmetic; the same numbers): [3, T, H, W]
    sources = (2, 1, 0) if channel_order == "BGR" else (0, 1, 2)
    video = torch.empty((3, *pixels.shape[:3]))
    for channel, source in enumerate(sources):
        plane = video[channel].copy_(pixels[..., source])
        plane.div_(255.0).sub_(IMAGENET_MEAN[channel]).div_(IMAGENET_STD[channel])
    return video


def video_to_frames(video: torch.Tensor, channel_order: str = "RGB") -> np.ndarray:
    """Inverse of :func:`frames_to_video`: ``[3, T, H, W]`` normalised -> ``[T, H, W, 3]`` RGB
    uint8 (values outside the image range, e.g. in reconstructions, are clipped)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 1, 3)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 1, 3)
    frames = video.detach().float().cpu().permute(1, 2, 3, 0) * std + mean  # [T, H, W, 3]
    if channel_order == "BGR":
        frames = frames.flip(-1)
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def rms_db(waveform: np.ndarray) -> float:
    """RMS level in dBFS (``-inf`` for digital silence)."""
    if waveform.size == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64))))
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")

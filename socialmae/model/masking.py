"""Token masking: per-sample random (unstructured) and time/frequency-structured for audio.

Convention (as in MAE): ``mask`` is 1 for a removed token and 0 for a kept one, in the
original token order; every sample keeps the same number of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

AudioMaskMode = Literal["unstructured", "time", "freq", "tf"]

# One generator for the whole batch, or one per sample: per-sample generators make a sample's
# mask independent of how the batch is split (across DDP ranks, or after a resume).
Generators = torch.Generator | Sequence[torch.Generator] | None


class Masked(NamedTuple):
    """Result of masking ``[B, L, D]`` tokens."""

    visible: torch.Tensor  # [B, K, D] kept tokens, in shuffled order
    mask: torch.Tensor  # [B, L] 1 = removed, original order
    ids_restore: torch.Tensor  # [B, L] position of each original token in [visible | removed]


def _uniform(shape: tuple[int, ...], like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Uniform noise of ``shape`` (first dim = batch) on ``like``'s device."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        return torch.rand(shape, generator=generator, device=device).to(like.device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    rows = [torch.rand(shape[1:], generator=g, device=g.device) for g in generator]
    return torch.stack(rows).to(like.device)


def kept_count(num_tokens: int, ratio: float) -> int:
    """Tokens kept per sample at masking ratio ``ratio`` (``int(L * (1 - ratio))``)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return max(1, int(num_tokens * (1 - ratio)))


def mask_by_noise(x: torch.Tensor, noise: torch.Tensor, ratio: float) -> Masked:
    """Keep the ``kept_count`` tokens with the lowest noise.

    Args:
        x: ``[B, L, D]`` tokens; noise: ``[B, L]`` scores (lower is kept).
    """
    b, n, d = x.shape
    keep = kept_count(n, ratio)
    ids_shuffle = noise.argsort(dim=1)  # [B, L] ascending: kept first
    ids_restore = ids_shuffle.argsort(dim=1)  # [B, L]
    ids_keep = ids_shuffle[:, :keep]  # [B, K]
    visible = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [B, K, D]
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)  # [B, L] back to original order
    return Masked(visible, mask, ids_restore)


def random_masking(x: torch.Tensor, ratio: float, generator: Generators = None) -> Masked:
    """Unstructured per-sample masking of ``[B, L, D]`` tokens at ``ratio``."""
    return mask_by_noise(x, _uniform(x.shape[:2], x, generator), ratio)


def _random_lines(
    b: int, n: int, k: int, like: torch.Tensor, generator: Generators
) -> torch.Tensor:
    """``[B, n]`` float, 1.0 on ``k`` randomly chosen lines per sample."""
    order = _uniform((b, n), like, generator).argsort(dim=1)[:, :k]  # [B, k]
    return torch.zeros(b, n, device=like.device).scatter_(1, order, 1.0)


def structured_audio_masking(
    x: torch.Tensor,
    ratio: float,
    grid: tuple[int, int],
    mode: AudioMaskMode = "time",
    generator: Generators = None,
) -> Masked:
    """Audio masking that prefers whole time columns and/or frequency rows (CAV-MAE ablation).

    Args:
        x: ``[B, F*T, D]`` audio tokens, frequency-major; grid: ``(F, T)`` token grid.
        mode: ``time`` masks ``int(T*ratio)`` columns, ``freq`` ``int(F*ratio)`` rows, ``tf``
            70% of each; the remaining count is filled at random.
    """
    if mode == "unstructured":
        return random_masking(x, ratio, generator)
    b, n, _ = x.shape
    f, t = grid
    if f * t != n:
        raise ValueError(f"audio grid {grid} does not match {n} tokens")
    noise = _uniform((b, f, t), x, generator)  # [B, F, T]
    if mode in ("time", "tf"):
        share = 0.7 if mode == "tf" else 1.0
        cols = _random_lines(b, t, int(t * ratio * share), x, generator)  # [B, T]
        noise = noise + 1.1 * cols[:, None, :]
    if mode in ("freq", "tf"):
        share = 0.7 if mode == "tf" else 1.0
        rows = _random_lines(b, f, int(f * ratio * share), x, generator)  # [B, F]
        noise = noise + 1.1 * rows[:, :, None]
    if mode not in ("time", "freq", "tf"):
        raise ValueError(f"unknown audio mask mode {mode!r}")
    return mask_by_noise(x, noise.reshape(b, n), ratio)


def unshuffle(
    visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """Put visible tokens back in place, filling removed ones with ``mask_token``.

    Args:
        visible: ``[B, K, D]``; ids_restore: ``[B, L]``; mask_token: ``[1, 1, D]``.
    Returns:
        ``[B, L, D]`` in the original token order.
    """
    b, k, d = visible.shape
    n = ids_restore.shape[1]
    filler = mask_token.to(visible.dtype).expand(b, n - k, d)
    full = torch.cat([visible, filler], dim=1)  # [B, L, D] shuffled order
    return full.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d))

"""Transformer layers, patchify functions and positional tables of Social-MAE.

Token order is defined in exactly one place, :func:`patchify_audio` / :func:`patchify_video`:
the tokenizers project their output and the reconstruction targets are their output, so the
two cannot drift apart (the reference implementation scored video predictions against
permuted targets; see :func:`reference_video_token_index`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Modality = Literal["a", "v"]


# --------------------------------------------------------------------------- patchify


def patchify_audio(fbank: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut an fbank into square patches, frequency-major.

    Args:
        fbank: ``[B, T, F]`` (time frames, mel bins).
        patch: patch side.
    Returns:
        ``[B, (F/patch) * (T/patch), patch * patch]``; token index ``f * (T/patch) + t``,
        per-token layout (frequency row, time column).
    """
    b, t, f = fbank.shape
    x = fbank.transpose(1, 2)  # [B, F, T]
    x = x.reshape(b, f // patch, patch, t // patch, patch)  # [B, Fg, p, Tg, q]
    x = x.permute(0, 1, 3, 2, 4)  # [B, Fg, Tg, p, q]
    return x.reshape(b, (f // patch) * (t // patch), patch * patch)


def unpatchify_audio(tokens: torch.Tensor, patch: int, length: int) -> torch.Tensor:
    """Inverse of :func:`patchify_audio`: ``[B, L, patch*patch]`` -> ``[B, length, F]``."""
    b, n, _ = tokens.shape
    tg = length // patch
    fg = n // tg
    x = tokens.reshape(b, fg, tg, patch, patch).permute(0, 1, 3, 2, 4)  # [B, Fg, p, Tg, q]
    return x.reshape(b, fg * patch, tg * patch).transpose(1, 2)


def patchify_video(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """Cut a clip into tubelets, time-major.

    Args:
        video: ``[B, C, T, H, W]``.
        tubelet: frames per tubelet (s); patch: pixels per side (p = q).
    Returns:
        ``[B, (T/s) * (H/p) * (W/p), s * p * p * C]``; token index ``t * Hg * Wg + h * Wg + w``,
        per-token layout (s, p, q, c) as in the released decoders.
    """
    b, c, t, h, w = video.shape
    tg, hg, wg = t // tubelet, h // patch, w // patch
    x = video.reshape(b, c, tg, tubelet, hg, patch, wg, patch)  # [B, C, Tg, s, Hg, p, Wg, q]
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, Tg, Hg, Wg, s, p, q, C]
    return x.reshape(b, tg * hg * wg, tubelet * patch * patch * c)


def unpatchify_video(
    tokens: torch.Tensor, tubelet: int, patch: int, grid: tuple[int, int, int], channels: int = 3
) -> torch.Tensor:
    """Inverse of :func:`patchify_video`: ``[B, L, s*p*p*C]`` -> ``[B, C, T, H, W]``."""
    b = tokens.shape[0]
    tg, hg, wg = grid
    x = tokens.reshape(b, tg, hg, wg, tubelet, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, Tg, s, Hg, p, Wg, q]
    return x.reshape(b, channels, tg * tubelet, hg * patch, wg * patch)


def reference_video_token_index(grid: tuple[int, int, int]) -> torch.Tensor:
    """Where each of our video tokens sits in the reference implementation's order.

    Ours is (t, h, w) with w fastest; the reference's is (h, w, t) with t fastest.

    Returns:
        ``[L]`` long tensor ``idx`` with ``reference_tokens[:, idx] == our_tokens``.
    """
    tg, hg, wg = grid
    t = torch.arange(tg).view(tg, 1, 1)
    h = torch.arange(hg).view(1, hg, 1)
    w = torch.arange(wg).view(1, 1, wg)
    return (h * wg * tg + w * tg + t).reshape(-1)


# --------------------------------------------------------------------------- positions


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos table: ``positions [N]`` -> ``[N, dim]`` (first half sin, second half cos)."""
    if dim % 2:
        raise ValueError(f"sin-cos width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [N, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """Row-major 2-D sin-cos table ``[rows * cols, dim]``: half the width per axis."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, r.reshape(-1)), sincos_1d(dim // 2, c.reshape(-1))], 1)


def sincos_3d(dim: int, frames: int, rows: int, cols: int) -> torch.Tensor:
    """Space-time sin-cos table ``[frames * rows * cols, dim]`` in (t, h, w) order.

    A quarter of the width encodes time, three eighths each the row and the column.
    """
    dt = dim // 4
    ds = (dim - dt) // 2
    t, r, c = torch.meshgrid(
        torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij"
    )
    return torch.cat(
        [
            sincos_1d(dt, t.reshape(-1)),
            sincos_1d(ds, r.reshape(-1)),
            sincos_1d(dim - dt - ds, c.reshape(-1)),
        ],
        dim=1,
    )


# --------------------------------------------------------------------------- transformer


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows [q; k; v])."""

    def __init__(self, dim: int, num_heads: int, use_sdpa: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, Dh]
        else:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # [B, H, N, N]
            out = scores.softmax(dim=-1) @ v  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` that keeps ``h`` for backward, not ``gelu(h)``.

    Autograd would store both the GELU input (for its derivative) and its output (for the
    weight gradient); recomputing the element-wise GELU in backward instead saves a quarter of
    a transformer block's activation memory at no measurable cost.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out: torch.Tensor):
        h, weight = ctx.saved_tensors
        with torch.enable_grad():
            h_leaf = h.detach().requires_grad_(True)
            activated = F.gelu(h_leaf)  # [..., hidden]
        grad_activated = (grad_out @ weight.to(grad_out.dtype)).to(activated.dtype)
        (grad_h,) = torch.autograd.grad(activated, h_leaf, grad_activated)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])  # [M, out]
        flat_act = activated.detach().reshape(-1, activated.shape[-1]).to(flat_out.dtype)
        grad_weight = (flat_out.T @ flat_act).to(weight.dtype)  # [out, hidden]
        grad_bias = flat_out.sum(0).to(weight.dtype)
        return grad_h, grad_weight, grad_bias


class Mlp(nn.Module):
    """Two-layer perceptron with exact GELU (memory-lean backward, see ``_GeluLinear``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``."""
        h = self.fc1(x)  # [B, N, hidden]
        if torch.is_grad_enabled() and (h.requires_grad or self.fc2.weight.requires_grad):
            return _GeluLinear.apply(h, self.fc2.weight, self.fc2.bias)
        return self.fc2(F.gelu(h))


class Block(nn.Module):
    """Pre-norm transformer block with the six-LayerNorm design of CAV-MAE.

    Attention and MLP weights are shared; ``norm1``/``norm2`` serve the joint (or single-stream)
    pass and ``norm1_a``/``norm2_a`` (``_v``) replace them when the block runs on audio (video)
    tokens alone, as the shared joint block does. Every block carries all six (the released
    format); :func:`freeze_modality_norms` marks them unused where the architecture never
    passes a modality.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        eps: float = 1e-5,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm1_a = nn.LayerNorm(dim, eps=eps)
        self.norm1_v = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, use_sdpa=use_sdpa)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm2_a = nn.LayerNorm(dim, eps=eps)
        self.norm2_v = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, modality: Modality | None = None) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``; ``modality`` picks the unimodal norms."""
        if modality is None:
            norm1, norm2 = self.norm1, self.norm2
        elif modality == "a":
            norm1, norm2 = self.norm1_a, self.norm2_a
        elif modality == "v":
            norm1, norm2 = self.norm1_v, self.norm2_v
        else:
            raise ValueError(f"modality must be 'a', 'v' or None, got {modality!r}")
        x = x + self.attn(norm1(x))
        return x + self.mlp(norm2(x))


def freeze_modality_norms(blocks: nn.ModuleList) -> None:
    """Mark the ``_a``/``_v`` norms of blocks that only ever run in joint mode as frozen.

    The released checkpoints hold them (at their initial values), so they stay in the state
    dict; freezing keeps them out of optimisers and weight decay.
    """
    for block in blocks:
        for name in ("norm1_a", "norm1_v", "norm2_a", "norm2_v"):
            getattr(block, name).requires_grad_(False)

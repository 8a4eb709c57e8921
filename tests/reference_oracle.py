"""A functional re-statement of the reference encoder, in the reference's layouts.

Used as an independent oracle: it reads the released state dict directly (Conv2d/Conv3d
kernels, video input with time last, (h, w, t) token order) and never touches
``socialmae.model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _block(x, sd, p, heads, modality=""):
    suffix = f"_{modality}" if modality else ""
    b, n, d = x.shape
    h = _ln(x, sd, f"{p}.norm1{suffix}")
    qkv = F.linear(h, sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"])
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5
    h = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + F.linear(h, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
    h = _ln(x, sd, f"{p}.norm2{suffix}")
    h = F.gelu(F.linear(h, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
    return x + F.linear(h, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])


def reference_features(sd, audio, video, mode, heads, depth):
    """Reference encoder tokens.

    Args:
        audio: [B, 1024, 128]; video: [B, 3, T, 224, 224] (converted here to time-last).
    Returns:
        tokens after the final norm, video tokens in (h, w, t) order.
    """
    a = audio.unsqueeze(1).transpose(2, 3)  # [B, 1, 128, 1024]
    w_a = sd["patch_embed_a.proj.weight"]
    a = F.conv2d(a, w_a, sd["patch_embed_a.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    a = a + sd["pos_embed_a"] + sd["modality_a"]
    w_v = sd["patch_embed_v.proj.weight"]
    if w_v.ndim == 5:
        v = video.permute(0, 1, 3, 4, 2)  # [B, 3, H, W, T] as the reference reads it
        v = F.conv3d(v, w_v, sd["patch_embed_v.proj.bias"], stride=(16, 16, w_v.shape[-1]))
    else:
        v = F.conv2d(video[:, :, 0], w_v, sd["patch_embed_v.proj.bias"], stride=16)
    v = v.flatten(2).transpose(1, 2) + sd["pos_embed_v"] + sd["modality_v"]
    for i in range(depth):
        a = _block(a, sd, f"blocks_a.{i}", heads)
        v = _block(v, sd, f"blocks_v.{i}", heads)
    if mode == "multimodal":
        return _ln(_block(torch.cat([a, v], 1), sd, "blocks_u.0", heads), sd, "norm")
    if mode == "audio":
        return _ln(_block(a, sd, "blocks_u.0", heads, "a"), sd, "norm_a")
    return _ln(_block(v, sd, "blocks_u.0", heads, "v"), sd, "norm_v")

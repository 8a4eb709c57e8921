"""The released checkpoints' key/shape list, written from the shared format reference.

Deliberately independent of ``socialmae.model``: tests build synthetic "official" files from
this list and check that they load strictly.
"""

from __future__ import annotations

import torch

Shapes = dict[str, tuple[int, ...]]

BLOCK_NORMS = ("norm1", "norm1_a", "norm1_v")
MLP_NORMS = ("norm2", "norm2_a", "norm2_v")


def _block(prefix: str, d: int, hidden: int) -> Shapes:
    keys: Shapes = {}
    for n in BLOCK_NORMS:
        keys[f"{prefix}.{n}.weight"] = (d,)
        keys[f"{prefix}.{n}.bias"] = (d,)
    keys[f"{prefix}.attn.qkv.weight"] = (3 * d, d)
    keys[f"{prefix}.attn.qkv.bias"] = (3 * d,)
    keys[f"{prefix}.attn.proj.weight"] = (d, d)
    keys[f"{prefix}.attn.proj.bias"] = (d,)
    for n in MLP_NORMS:
        keys[f"{prefix}.{n}.weight"] = (d,)
        keys[f"{prefix}.{n}.bias"] = (d,)
    keys[f"{prefix}.mlp.fc1.weight"] = (hidden, d)
    keys[f"{prefix}.mlp.fc1.bias"] = (hidden,)
    keys[f"{prefix}.mlp.fc2.weight"] = (d, hidden)
    keys[f"{prefix}.mlp.fc2.bias"] = (d,)
    return keys


def official_shapes(
    family: str = "social-mae",
    kind: str = "pretrain",
    label_dim: int = 6,
    d: int = 768,
    depth: int = 11,
    dd: int = 512,
    decoder_depth: int = 8,
    frames: int = 8,
) -> Shapes:
    """Names and shapes of a released state dict (defaults: the published models)."""
    video_tokens = 196 * frames // 2 if family == "social-mae" else 196
    keys: Shapes = {
        "modality_a": (1, 1, d),
        "modality_v": (1, 1, d),
        "pos_embed_a": (1, 512, d),
        "pos_embed_v": (1, video_tokens, d),
        "patch_embed_a.proj.weight": (d, 1, 16, 16),
        "patch_embed_a.proj.bias": (d,),
        "patch_embed_v.proj.weight": (d, 3, 16, 16, 2)
        if family == "social-mae"
        else (d, 3, 16, 16),
        "patch_embed_v.proj.bias": (d,),
    }
    for i in range(depth):
        keys |= _block(f"blocks_a.{i}", d, 4 * d)
    for i in range(depth):
        keys |= _block(f"blocks_v.{i}", d, 4 * d)
    keys |= _block("blocks_u.0", d, 4 * d)
    for n in ("norm_a", "norm_v", "norm"):
        keys[f"{n}.weight"] = (d,)
        keys[f"{n}.bias"] = (d,)
    if kind == "pretrain":
        keys |= {
            "mask_token": (1, 1, dd),
            "decoder_modality_a": (1, 1, dd),
            "decoder_modality_v": (1, 1, dd),
            "decoder_pos_embed_a": (1, 512, dd),
            "decoder_pos_embed_v": (1, video_tokens, dd),
            "decoder_embed.weight": (dd, d),
            "decoder_embed.bias": (dd,),
        }
        for i in range(decoder_depth):
            keys |= _block(f"decoder_blocks.{i}", dd, 4 * dd)
        pred_v = 1536 if family == "social-mae" else 768
        keys |= {
            "decoder_norm.weight": (dd,),
            "decoder_norm.bias": (dd,),
            "decoder_pred_a.weight": (256, dd),
            "decoder_pred_a.bias": (256,),
            "decoder_pred_v.weight": (pred_v, dd),
            "decoder_pred_v.bias": (pred_v,),
        }
    else:
        keys |= {
            "mlp_head.0.weight": (d,),
            "mlp_head.0.bias": (d,),
            "mlp_head.1.weight": (label_dim, d),
            "mlp_head.1.bias": (label_dim,),
        }
    return keys


def synthetic_state_dict(
    shapes: Shapes, seed: int = 0, prefix: str = "module.", scale: float = 0.02
) -> dict[str, torch.Tensor]:
    """Random tensors with these shapes; LayerNorm weights around 1, as trained ones are."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=g) * scale
        if ".norm" in key or key.startswith(("norm", "mlp_head.0")):
            value = value + (1.0 if key.endswith("weight") else 0.0)
        sd[prefix + key] = value
    return sd

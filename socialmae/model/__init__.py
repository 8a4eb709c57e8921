"""Social-MAE model: configuration, layers, masking, pretraining and fine-tuning models.

The configuration is light and imported at once; the torch modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from socialmae.model.config import MODES, PRESETS, Mode, SocialMAEConfig, get_preset

_TORCH_NAMES = (
    "EncoderFeatures",
    "PretrainOutput",
    "Reconstruction",
    "SocialMAE",
    "SocialMAEClassifier",
    "SocialMAEEncoder",
)

__all__ = [
    "MODES",
    "PRESETS",
    "EncoderFeatures",
    "Mode",
    "PretrainOutput",
    "Reconstruction",
    "SocialMAE",
    "SocialMAEClassifier",
    "SocialMAEConfig",
    "SocialMAEEncoder",
    "get_preset",
]

if TYPE_CHECKING:
    from socialmae.model.social_mae import (
        EncoderFeatures,
        PretrainOutput,
        Reconstruction,
        SocialMAE,
        SocialMAEClassifier,
        SocialMAEEncoder,
    )


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        value = getattr(importlib.import_module("socialmae.model.social_mae"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

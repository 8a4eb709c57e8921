"""Social-MAE model: configuration, layers, masking, pretraining and fine-tuning models.

The configuration is light and imported at once; the torch modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from socialmae.model.config import MODES, PRESETS, Mode, SocialMAEConfig, get_preset

_LAZY = {  # torch-backed name -> module that defines it
    "EncoderFeatures": "socialmae.model.social_mae",
    "PretrainOutput": "socialmae.model.social_mae",
    "Reconstruction": "socialmae.model.social_mae",
    "SocialMAE": "socialmae.model.social_mae",
    "SocialMAEClassifier": "socialmae.model.social_mae",
    "SocialMAEEncoder": "socialmae.model.social_mae",
}

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
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Social-MAE model: configuration, layers, masking, pretraining and fine-tuning models.

The configuration is light and imported at once; the torch modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from socialmae.lazy import lazy_attributes
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


__getattr__ = lazy_attributes(__name__, _LAZY)

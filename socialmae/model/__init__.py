"""Social-MAE model: configuration, layers, masking, pretraining and fine-tuning models."""

from socialmae.model.config import PRESETS, SocialMAEConfig, get_preset
from socialmae.model.social_mae import (
    MODES,
    EncoderFeatures,
    PretrainOutput,
    Reconstruction,
    SocialMAE,
    SocialMAEClassifier,
    SocialMAEEncoder,
)

__all__ = [
    "MODES",
    "PRESETS",
    "EncoderFeatures",
    "PretrainOutput",
    "Reconstruction",
    "SocialMAE",
    "SocialMAEClassifier",
    "SocialMAEConfig",
    "SocialMAEEncoder",
    "get_preset",
]

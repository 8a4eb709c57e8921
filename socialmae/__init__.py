"""Social-MAE: an audiovisual masked autoencoder for face and voice, with its MLOps pipeline."""

from socialmae.checkpoints import CheckpointError, load_checkpoint
from socialmae.losses import LossWeights
from socialmae.model import (
    PRESETS,
    SocialMAE,
    SocialMAEClassifier,
    SocialMAEConfig,
    get_preset,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "LossWeights",
    "SocialMAE",
    "SocialMAEClassifier",
    "SocialMAEConfig",
    "__version__",
    "get_preset",
    "load_checkpoint",
]

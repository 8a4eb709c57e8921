"""Social-MAE: an audiovisual masked autoencoder for face and voice, with its MLOps pipeline.

The public names load on first use (PEP 562), so ``import socialmae`` and the ``socialmae``
command start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from socialmae.lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {  # public name -> module that defines it
    "CheckpointError": "socialmae.state_dicts",
    "load_checkpoint": "socialmae.checkpoints",
    "LossWeights": "socialmae.losses",
    "PRESETS": "socialmae.model.config",
    "SocialMAEConfig": "socialmae.model.config",
    "get_preset": "socialmae.model.config",
    "SocialMAE": "socialmae.model.social_mae",
    "SocialMAEClassifier": "socialmae.model.social_mae",
}

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

if TYPE_CHECKING:
    from socialmae.checkpoints import CheckpointError, load_checkpoint
    from socialmae.losses import LossWeights
    from socialmae.model.config import PRESETS, SocialMAEConfig, get_preset
    from socialmae.model.social_mae import SocialMAE, SocialMAEClassifier


__getattr__ = lazy_attributes(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

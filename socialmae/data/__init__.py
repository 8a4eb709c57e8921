"""Data: dataset sources, decoding, face cropping, shards, validation and the loader.

``load_clip`` (any media file -> model inputs, as in training) loads on first use (PEP 562),
so importing a light submodule does not import the loader's torch stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {  # public name -> module that defines it
    "ClipInputs": "socialmae.data.dataset",
    "load_clip": "socialmae.data.dataset",
}

__all__ = ["ClipInputs", "load_clip"]

if TYPE_CHECKING:
    from socialmae.data.dataset import ClipInputs, load_clip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

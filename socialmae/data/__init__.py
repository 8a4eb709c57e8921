"""Data: dataset sources, decoding, face cropping, shards, validation and the loader.

``load_clip`` (any media file -> model inputs, as in training) loads on first use (PEP 562),
so importing a light submodule does not import the loader's torch stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from socialmae.lazy import lazy_attributes

_LAZY = {  # public name -> module that defines it
    "ClipInputs": "socialmae.data.inputs",
    "load_clip": "socialmae.data.inputs",
}

__all__ = ["ClipInputs", "load_clip"]

if TYPE_CHECKING:
    from socialmae.data.inputs import ClipInputs, load_clip


__getattr__ = lazy_attributes(__name__, _LAZY)

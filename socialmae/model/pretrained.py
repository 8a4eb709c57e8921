"""The saved-directory format of our models: ``config.json`` + ``model.safetensors``.

``config.json`` records the format version, the architecture (class name, head size, task,
labels, mode) and the model config; the weights are safetensors under this package's names.
Reading and writing only: :meth:`SocialMAEEncoder.save_pretrained` / ``from_pretrained``
build the model. The official ``.pth`` conversion lives in :mod:`socialmae.checkpoints`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from socialmae.io import atomic_directory
from socialmae.model.config import SocialMAEConfig
from socialmae.state_dicts import CheckpointError, StateDict, read_state_dict

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class Saveable(Protocol):
    config: SocialMAEConfig

    def architecture(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...


def write_pretrained(model: Saveable, directory: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory``, replacing it atomically."""

    def write(tmp: Path) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "socialmae"})
        meta = {"format_version": FORMAT_VERSION, **model.architecture(),
                "config": model.config.to_dict()}  # fmt: skip
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    return atomic_directory(directory, write)


def read_pretrained(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], StateDict]:
    """``(config.json as a dict, tensors)`` of a saved directory.

    Raises:
        CheckpointError: a file is missing, or not valid JSON / safetensors.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointError(directory, f"missing {p.name}")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(config_path, f"invalid JSON ({exc})") from exc
    return meta, read_state_dict(weights_path)

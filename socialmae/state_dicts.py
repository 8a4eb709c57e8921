"""Reading and checking state dicts: the one place foreign weight files are opened.

``.pth`` files are read with ``torch.load(weights_only=True)`` (no code runs), ``.safetensors``
with safetensors; both come back as plain ``name -> tensor`` dicts, ``module.`` prefixes and
``state_dict`` / ``model`` wrappers removed. Used by the Social-MAE checkpoint code and the
face detector's weights alike; it imports neither.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "file is empty")
    try:  # zip-format files are memory-mapped: a 700 MB checkpoint is not read twice
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as exc:  # also what weights_only raises for code objects
        raise CheckpointError(
            path, f"not a torch checkpoint of plain tensors, or truncated ({exc})"
        ) from exc
    except Exception as exc:
        raise CheckpointError(path, f"truncated or not a torch checkpoint ({exc})") from exc


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Tensors of a ``.pth`` (``weights_only=True``) or ``.safetensors`` file, ``module.``
    prefixes removed.

    Raises:
        CheckpointError: missing, empty, truncated, or not a dict of tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(path, "no such file")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(path, f"unreadable safetensors file ({exc})") from exc
        return {k.removeprefix("module."): v for k, v in tensors.items()}
    obj = _torch_load(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(path, f"expected a state dict, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(path, f"not a state dict of tensors (e.g. entry {bad[0]!r})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def state_dict_mismatches(
    model: torch.nn.Module, sd: StateDict, source: str = "checkpoint"
) -> list[str]:
    """Missing, unexpected and wrongly shaped tensors of ``sd`` against ``model``."""
    expected = model.state_dict()
    problems = []
    if missing := sorted(set(expected) - set(sd)):
        problems.append(f"missing {len(missing)} tensor(s): {missing[:8]}")
    if unexpected := sorted(set(sd) - set(expected)):
        problems.append(f"unexpected {len(unexpected)} tensor(s): {unexpected[:8]}")
    for key in sorted(set(sd) & set(expected)):
        if sd[key].shape != expected[key].shape:
            problems.append(
                f"{key}: {source} {list(sd[key].shape)} vs model {list(expected[key].shape)}"
            )
    return problems


def load_strict(model: torch.nn.Module, sd: StateDict, path: str | os.PathLike[str]) -> None:
    """Load ``sd`` into ``model`` strictly, or raise :class:`CheckpointError` listing every
    missing, unexpected and wrongly shaped tensor."""
    problems = state_dict_mismatches(model, sd)
    if problems:
        raise CheckpointError(path, "does not match the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)

"""``params.yaml`` -> frozen dataclasses, validated: an unknown key or a bad value stops with a
message naming the key (``crop.frame_rate: expected a number, got 'fast'``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ParamsError(ValueError):
    """A parameter that cannot be used, with its dotted key."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ParamsError as exc:
                errors.append(exc.reason)
        raise ParamsError(key, "; ".join(errors))
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise ParamsError(key, f"expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ParamsError(key, f"expected a list, got {value!r}")
        args = typing.get_args(kind)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, value, key)  # type: ignore[arg-type]
    if kind is bool:
        if not isinstance(value, bool):
            raise ParamsError(key, f"expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(key, f"expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(key, f"expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ParamsError(key, f"expected a string, got {value!r}")
        return value
    return value


def from_mapping(cls: type[T], mapping: Any, key: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; every key must be a field.

    A ``ParamsError`` that ``cls`` raises itself (say from ``__post_init__``) names a field
    (``fractions``); it is re-raised under the full key (``download.cremad.fractions``).
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ParamsError(key or "<root>", f"expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    prefix = f"{key}." if key else ""
    unknown = sorted(set(mapping) - fields)
    if unknown:
        raise ParamsError(f"{prefix}{unknown[0]}", f"unknown key; known keys: {sorted(fields)}")
    values = {name: _coerce(v, hints[name], f"{prefix}{name}") for name, v in mapping.items()}
    try:
        return cls(**values)
    except ParamsError as exc:  # raised by a __post_init__ check with the field's own key
        raise ParamsError(f"{prefix}{exc.key}", exc.reason) from exc
    except (ValueError, TypeError) as exc:
        raise ParamsError(key or "<root>", str(exc)) from exc


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` on top, nested mappings merged key by key (neither is changed)."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
SECTIONS = ("tasks", "mlflow", "data", "download", "crop", "validate", "pretrain", "finetune",
            "tune", "register")  # fmt: skip  # the top level of params.yaml


def check_device(value: str) -> None:
    """``device`` params: auto, cpu, mps, cuda or cuda:N (raises ``ParamsError``)."""
    if not isinstance(value, str) or not DEVICE.fullmatch(value):
        raise ParamsError("device", f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")


def check_preset(name: str) -> None:
    """A model preset name (raises ``ParamsError`` naming the choices)."""
    from socialmae.model.config import get_preset

    try:
        get_preset(name)
    except KeyError as exc:
        raise ParamsError("preset", str(exc.args[0])) from None


def load_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The pipeline's params file: :func:`load_yaml`, with every top-level section known (a
    misspelt ``pretrian:`` would otherwise be ignored and its stage run on defaults)."""
    data = load_yaml(path)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(unknown[0], f"unknown section of {path}; known: {list(SECTIONS)}")
    return data


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a params file (a mapping at the top)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError as exc:
        raise ParamsError(str(p), "no such params file") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(str(p), f"invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ParamsError(str(p), "expected a mapping at the top level")
    return data


def section(cls: type[T], path: str | os.PathLike[str], name: str) -> T:
    """Parse one top-level section of a params file into ``cls``."""
    return from_mapping(cls, load_yaml(path).get(name), name)

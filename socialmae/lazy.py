"""PEP 562 lazy attributes: a package names what it exports, the defining module loads on
first use (so ``import socialmae`` and the ``socialmae`` command do not import torch)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that resolves ``name`` from the module
    ``table[name]`` on first use and keeps it in the package's namespace."""

    def resolve(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return resolve

"""The search space of a tuning study: typed dimensions parsed from params.yaml."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.trial import BaseTrial

from socialmae.params import ParamsError, from_mapping

log = logging.getLogger(__name__)


class TuneError(RuntimeError):
    """A study that cannot run or produced nothing usable (no credentials in the message)."""


def check_fields(checks: Mapping[str, tuple[bool, str]]) -> None:
    """Raise a ParamsError naming the first failed field (``from_mapping`` adds the section)."""
    for name, (ok, reason) in checks.items():
        if not ok:
            raise ParamsError(name, reason)


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class FloatRange:
    """A float from ``[low, high]``, sampled on a log scale when ``log``."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        check_fields(
            {
                "low": (math.isfinite(self.low), "must be finite"),
                "high": (math.isfinite(self.high), "must be finite"),
            }
        )
        check_fields({"low": (self.low < self.high, f"must be < high ({self.low} >= {self.high})")})
        check_fields({"low": (not self.log or self.low > 0, "must be > 0 with log: true")})


@dataclass(frozen=True)
class IntRange:
    """An integer from ``low, low + step, ..., high`` (log scale when ``log``; step is then 1)."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self) -> None:
        check_fields(
            {
                "low": (self.low < self.high, f"must be < high ({self.low} >= {self.high})"),
                "step": (self.step >= 1, "must be >= 1"),
            }
        )
        check_fields(
            {
                "step": (not self.log or self.step == 1, "must be 1 with log: true"),
                "low": (not self.log or self.low >= 1, "must be >= 1 with log: true"),
                "high": (
                    (self.high - self.low) % self.step == 0,
                    f"high - low must be a multiple of step ({self.step})",
                ),
            }
        )


@dataclass(frozen=True)
class Choice:
    """One of ``choices``: numbers, strings, booleans or null."""

    choices: tuple[Any, ...]

    def __post_init__(self) -> None:
        shown = list(self.choices)
        check_fields({"choices": (len(shown) >= 1, "must not be empty")})
        allowed = all(isinstance(c, type(None) | bool | int | float | str) for c in shown)
        check_fields(
            {"choices": (allowed, f"only numbers, strings, booleans or null, got {shown!r}")}
        )
        distinct = len({(type(c), c) for c in shown}) == len(shown)
        check_fields({"choices": (distinct, f"duplicates in {shown!r}")})


Dimension = FloatRange | IntRange | Choice
_KINDS: dict[str, type[Dimension]] = {"float": FloatRange, "int": IntRange, "categorical": Choice}
_REQUIRED = {"float": ("low", "high"), "int": ("low", "high"), "categorical": ("choices",)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dimension(spec: Any, key: str) -> Dimension:
    """Parse one ``tune.space.<name>`` entry."""
    if not isinstance(spec, Mapping):
        raise ParamsError(
            key,
            "expected a mapping such as {low: 1.0e-5, high: 1.0e-3, log: true}, "
            f"{{low: 8, high: 64, step: 8}} or {{choices: [a, b]}}, got {spec!r}",
        )
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind is None:
        if "choices" in spec:
            kind = "categorical"
        else:
            kind = "int" if _is_int(spec.get("low")) and _is_int(spec.get("high")) else "float"
    if kind not in _KINDS:
        raise ParamsError(f"{key}.type", f"expected one of {list(_KINDS)}, got {kind!r}")
    for name in _REQUIRED[kind]:
        if name not in spec:
            raise ParamsError(f"{key}.{name}", f"missing (a {kind} range needs {_REQUIRED[kind]})")
    for name in ("low", "high"):
        value = spec.get(name)
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                continue
            raise ParamsError(
                f"{key}.{name}",
                f"expected a number, got {value!r} (YAML reads an exponent without a dot as "
                "text: write 1.0e-5, not 1e-5)",
            )
    return from_mapping(_KINDS[kind], spec, key)


_SPEC_KEYS = frozenset({"type", "low", "high", "step", "log", "choices"})


def _flatten_space(
    mapping: Mapping[Any, Any], key: str, prefix: str
) -> Iterator[tuple[str, Dimension]]:
    """``(dotted name, dimension)`` pairs; a mapping without any range key is a group."""
    for name, spec in mapping.items():
        dotted = f"{prefix}{name}"
        if isinstance(spec, Mapping) and spec and not _SPEC_KEYS & set(spec):
            yield from _flatten_space(spec, key, f"{dotted}.")
        else:
            yield dotted, _dimension(spec, f"{key}.{dotted}")


def _is_param_name(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


@dataclass(frozen=True)
class SearchSpace:
    """The fine-tuning params to tune (``tune.space``): name -> dimension, in file order.

    Each name is the (dotted) fine-tuning param it overrides: ``head_lr``, ``batch``,
    ``optim.lr``, ``augment.mixup``...
    """

    dimensions: tuple[tuple[str, Dimension], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.dimensions]
        check_fields(
            {
                "dimensions": (len(names) >= 1, "empty search space: name a param to tune"),
                **{name: (_is_param_name(name), "not a param name") for name in names},
            }
        )
        check_fields({"dimensions": (len(set(names)) == len(names), f"duplicate names in {names}")})

    @classmethod
    def parse(cls, mapping: Any, key: str = "tune.space") -> SearchSpace:
        """Parse ``{name: {low, high, log} | {low, high, step} | {choices}}``.

        Names may be dotted (``optim.lr``) or nested (``optim: {lr: {low, high}}``, which is
        what ``dvc exp run -S tune.space.optim.lr.high=...`` addresses); both mean ``optim.lr``.
        """
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ParamsError(key, f"expected a mapping of param name -> range, got {mapping!r}")
        dims = tuple(_flatten_space(mapping, key, ""))
        try:
            return cls(dims)
        except ParamsError as exc:
            where = key if exc.key == "dimensions" else f"{key}.{exc.key}"
            raise ParamsError(where, exc.reason) from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.dimensions)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A JSON-ready copy, with the kind of each dimension spelled out."""
        out: dict[str, dict[str, Any]] = {}
        for name, dim in self.dimensions:
            if isinstance(dim, FloatRange):
                out[name] = {"type": "float", "low": dim.low, "high": dim.high, "log": dim.log}
            elif isinstance(dim, IntRange):
                out[name] = {
                    "type": "int",
                    "low": dim.low,
                    "high": dim.high,
                    "step": dim.step,
                    "log": dim.log,
                }
            else:
                out[name] = {"type": "categorical", "choices": list(dim.choices)}
        return out


def suggest(trial: BaseTrial, space: SearchSpace) -> dict[str, Any]:
    """Draw (or, for a retried trial, reuse) one value per dimension: the fine-tuning overrides."""
    overrides: dict[str, Any] = {}
    for name, dim in space.dimensions:
        if isinstance(dim, FloatRange):
            overrides[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        elif isinstance(dim, IntRange):
            overrides[name] = trial.suggest_int(name, dim.low, dim.high, step=dim.step, log=dim.log)
        else:
            overrides[name] = trial.suggest_categorical(name, list(dim.choices))
    return overrides

"""The datasets ``stage_download`` can prepare: name -> (params dataclass, prepare function).

Each ``download.<name>`` section of params.yaml parses into the source's frozen dataclass; its
``prepare(params, out_dir)`` writes ``out_dir`` (raw media or links to it, plus
``manifest.parquet``) and returns the manifest frame. Paths in params are relative to the
directory the stage runs in (the repository root under ``dvc repro``). Credentials never appear
in params: a source that downloads reads them from the environment variables its ``auth``
section names (:class:`socialmae.data.download.AuthEnv`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from socialmae.data.download import AuthEnv, fetch_archives
from socialmae.data.sources.cremad import BASE_URL, prepare_cremad
from socialmae.data.sources.firstimpressions import prepare_firstimpressions
from socialmae.data.sources.ndcme import SPEAKER_PATTERN, prepare_ndcme
from socialmae.data.sources.splits import LinkMode, check_fractions
from socialmae.data.sources.voxceleb2 import prepare_voxceleb2
from socialmae.params import ParamsError, from_mapping

Fractions = tuple[float, ...]
Urls = str | tuple[str, ...]


def _check_fractions(fractions: Fractions) -> None:
    try:
        check_fractions(fractions)
    except ValueError as exc:
        raise ParamsError("fractions", str(exc).removeprefix("fractions: ")) from None


def _check_positive(**values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ParamsError(name, f"expected > 0, got {value}")


@dataclass(frozen=True)
class DemoParams:
    """The generated demo set (``download.demo``)."""

    identities: int = 24
    sentences: int = 1
    seconds: float = 3.0
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        _check_positive(
            identities=self.identities,
            sentences=self.sentences,
            seconds=self.seconds,
            workers=self.workers,
        )


@dataclass(frozen=True)
class CremadParams:
    """CREMA-D (``download.cremad``): downloaded file by file, or indexed from a local copy."""

    source: str | None = None  # base URL or local directory; None = the public GitHub media
    names: str | None = None  # names file (SentenceFilenames.csv or one per line); None = all
    limit: int | None = None  # first N names only
    modalities: tuple[Literal["video", "audio"], ...] = ("video", "audio")
    mode: LinkMode = "symlink"  # how files of a local source are referenced
    fractions: Fractions = (0.8, 0.1, 0.1)
    seed: int = 0
    workers: int = 4
    retries: int = 5
    timeout: float = 30.0
    auth: AuthEnv = field(default_factory=AuthEnv)

    def __post_init__(self) -> None:
        _check_fractions(self.fractions)
        _check_positive(limit=self.limit, workers=self.workers, timeout=self.timeout)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ParamsError("modalities", f"expected video and/or audio, got {self.modalities}")


@dataclass(frozen=True)
class VoxCeleb2Params:
    """VoxCeleb2 (``download.voxceleb2``): a local tree, or archives fetched from a URL list."""

    root: str | None = None  # holds dev/mp4/<speaker>/<video>/<n>.mp4 (and test/mp4)
    urls: Urls | None = None  # URL list file (URL [SHA256] per line) or a list of URLs
    subsets: tuple[Literal["dev", "test"], ...] = ("dev", "test")
    limit: int | None = None
    mode: LinkMode = "symlink"
    fractions: Fractions = (0.8, 0.1, 0.1)
    seed: int = 0
    retries: int = 5
    timeout: float = 30.0
    auth: AuthEnv = field(default_factory=AuthEnv)

    def __post_init__(self) -> None:
        _check_fractions(self.fractions)
        _check_positive(limit=self.limit, timeout=self.timeout)


@dataclass(frozen=True)
class FirstImpressionsParams:
    """ChaLearn First Impressions v2 (``download.firstimpressions``)."""

    root: str | None = None  # directory searched recursively for *.mp4
    annotations: str | None = None  # where annotation_{training,validation,test}.pkl are
    urls: Urls | None = None  # archives fetched and extracted first (root = where they go)
    split: Literal["auto", "official", "speaker"] = "auto"
    mode: LinkMode = "symlink"
    fractions: Fractions = (0.8, 0.1, 0.1)
    seed: int = 0
    retries: int = 5
    timeout: float = 30.0
    auth: AuthEnv = field(default_factory=AuthEnv)

    def __post_init__(self) -> None:
        _check_fractions(self.fractions)
        _check_positive(timeout=self.timeout)


@dataclass(frozen=True)
class NdcmeParams:
    """NDC-ME (``download.ndcme``): clips plus a labels CSV."""

    root: str | None = None  # the clip directory; CSV file entries are relative to it
    labels_csv: str | None = None  # None = <root>/labels.csv
    speaker_pattern: str = SPEAKER_PATTERN
    urls: Urls | None = None  # archives fetched and extracted first (root = where they go)
    mode: LinkMode = "symlink"
    fractions: Fractions = (0.8, 0.1, 0.1)
    seed: int = 0
    retries: int = 5
    timeout: float = 30.0
    auth: AuthEnv = field(default_factory=AuthEnv)

    def __post_init__(self) -> None:
        _check_fractions(self.fractions)
        _check_positive(timeout=self.timeout)
        try:
            re.compile(self.speaker_pattern)
        except re.error as exc:
            raise ParamsError("speaker_pattern", f"not a regular expression: {exc}") from None


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value is not None else None


def _urls(value: Urls | None) -> str | list[str] | None:
    return list(value) if isinstance(value, tuple) else value


def _prepare_demo(p: DemoParams, out_dir: Path) -> pd.DataFrame:
    from socialmae.data.sources.demo import prepare_demo  # PyAV, SciPy, espeak-ng: when used

    return prepare_demo(
        out_dir,
        identities=p.identities,
        sentences=p.sentences,
        seconds=p.seconds,
        seed=p.seed,
        workers=p.workers,
    )


def _prepare_cremad(p: CremadParams, out_dir: Path) -> pd.DataFrame:
    source = p.source if p.source is not None else BASE_URL
    if "://" not in source:
        source = str(Path(source).expanduser())
    return prepare_cremad(
        _path(p.names),
        out_dir,
        base_url=source,
        limit=p.limit,
        modalities=p.modalities,
        fractions=p.fractions,
        seed=p.seed,
        workers=p.workers,
        retries=p.retries,
        timeout=p.timeout,
        mode=p.mode,
        auth_env=p.auth,
    )


def _prepare_voxceleb2(p: VoxCeleb2Params, out_dir: Path) -> pd.DataFrame:
    return prepare_voxceleb2(
        _path(p.root),
        out_dir,
        urls=_urls(p.urls),
        subsets=p.subsets,
        limit=p.limit,
        mode=p.mode,
        fractions=p.fractions,
        seed=p.seed,
        retries=p.retries,
        timeout=p.timeout,
        auth_env=p.auth,
    )


def _fetched_root(p: FirstImpressionsParams | NdcmeParams, out_dir: Path) -> tuple[Path, list[str]]:
    """The media root; with ``urls``, their archives are fetched and extracted there first."""
    root = _path(p.root)
    if p.urls is None:
        if root is None:
            raise ParamsError("root", "set root (a local directory) or urls")
        return root, []
    root = root if root is not None else out_dir / "media"
    failed = fetch_archives(
        _urls(p.urls),
        out_dir / "archives",
        root,
        retries=p.retries,
        timeout=p.timeout,
        progress=True,
        auth_env=p.auth,
    )
    return root, failed


def _with_failed(frame: pd.DataFrame, failed: list[str]) -> pd.DataFrame:
    frame.attrs["missing"] = [*failed, *frame.attrs.get("missing", [])]
    return frame


def _prepare_firstimpressions(p: FirstImpressionsParams, out_dir: Path) -> pd.DataFrame:
    root, failed = _fetched_root(p, out_dir)
    frame = prepare_firstimpressions(
        root,
        out_dir,
        annotations_dir=_path(p.annotations),
        split=p.split,
        mode=p.mode,
        fractions=p.fractions,
        seed=p.seed,
    )
    return _with_failed(frame, failed)


def _prepare_ndcme(p: NdcmeParams, out_dir: Path) -> pd.DataFrame:
    root, failed = _fetched_root(p, out_dir)
    frame = prepare_ndcme(
        root,
        out_dir,
        labels_csv=_path(p.labels_csv),
        speaker_pattern=p.speaker_pattern,
        mode=p.mode,
        fractions=p.fractions,
        seed=p.seed,
    )
    return _with_failed(frame, failed)


@dataclass(frozen=True)
class Source:
    """One selectable dataset.

    ``required``: groups of fields of which at least one must be set (not null) when the
    dataset is selected, e.g. ``(("root", "urls"),)``.
    """

    params: type
    prepare: Callable[[Any, Path], pd.DataFrame]
    required: tuple[tuple[str, ...], ...] = ()


SOURCES: dict[str, Source] = {
    "demo": Source(DemoParams, _prepare_demo),
    "cremad": Source(CremadParams, _prepare_cremad),
    "voxceleb2": Source(VoxCeleb2Params, _prepare_voxceleb2, (("root", "urls"),)),
    "firstimpressions": Source(
        FirstImpressionsParams, _prepare_firstimpressions, (("root", "urls"),)
    ),
    "ndcme": Source(NdcmeParams, _prepare_ndcme, (("root", "urls"),)),
}


def check_names(names: tuple[str, ...], key: str = "data.datasets") -> tuple[str, ...]:
    """``names`` if each is a known source, once; else a ParamsError naming the entry."""
    if not names:
        raise ParamsError(key, f"select at least one dataset of {sorted(SOURCES)}")
    for i, name in enumerate(names):
        if name not in SOURCES:
            raise ParamsError(f"{key}[{i}]", f"unknown dataset {name!r}; known: {sorted(SOURCES)}")
        if name in names[:i]:
            raise ParamsError(f"{key}[{i}]", f"{name!r} is listed twice")
    return names


def parse_download(
    mapping: Any, selected: tuple[str, ...], key: str = "download"
) -> dict[str, Any]:
    """Parse every ``download.<name>`` section; check the required fields of ``selected``.

    Sections of datasets that are not selected are still parsed (a typo fails early), and a
    missing section means the defaults. Returns ``{name: params}`` for ``selected``.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ParamsError(key, f"expected a mapping, got {mapping!r}")
    unknown = sorted(set(mapping) - set(SOURCES))
    if unknown:
        raise ParamsError(f"{key}.{unknown[0]}", f"unknown dataset; known: {sorted(SOURCES)}")
    parsed = {
        name: from_mapping(source.params, mapping.get(name), f"{key}.{name}")
        for name, source in SOURCES.items()
    }
    for name in selected:
        params = parsed[name]
        for group in SOURCES[name].required:
            if all(getattr(params, f) is None for f in group):
                others = f" (or {', '.join(group[1:])})" if len(group) > 1 else ""
                raise ParamsError(
                    f"{key}.{name}.{group[0]}",
                    f"required when data.datasets selects {name}{others}",
                )
    return {name: parsed[name] for name in selected}

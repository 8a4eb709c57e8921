"""ChaLearn First Impressions (v2): 10,000 YouTube clips with Big-Five trait scores in [0, 1].

Read from a local directory of ``*.mp4`` files (any sub-folders, e.g. ``train/``, ``val/``,
``test/``) plus the annotation pickles ``annotation_training.pkl``,
``annotation_validation.pkl`` and ``annotation_test.pkl``: each a dict ``trait -> {video file
name: score}``. The pickles are read with an unpickler that refuses every class except the few
numpy reconstructors that numeric scores need (see :class:`_PlainUnpickler`), so only plain
containers, strings, numbers and numpy numbers/arrays of numbers load; nothing can run code.
"""

from __future__ import annotations

import logging
import numbers
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from socialmae.data.errors import MediaError
from socialmae.data.manifest import ManifestRow, read_manifest, write_manifest
from socialmae.data.sources.splits import (
    LinkMode,
    assign_speaker_splits,
    check_disjoint,
    place_media,
    report_missing,
    require_dir,
)
from socialmae.tasks import TRAITS

log = logging.getLogger(__name__)

DATASET = "firstimpressions"
ANNOTATION_FILES = {
    "train": "annotation_training.pkl",
    "val": "annotation_validation.pkl",
    "test": "annotation_test.pkl",
}
IGNORED_KEYS = frozenset({"interview"})

SplitMode = Literal["auto", "official", "speaker"]


NUMERIC_KINDS = "fiu"  # numpy dtype kinds a score may have: float, signed, unsigned


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"refusing to load {what}")


class _DType:
    """Stands in for ``numpy.dtype`` while unpickling: a plain numeric dtype, nothing else."""

    def __init__(self, spec: object, align: object = False, copy: object = False) -> None:
        if not isinstance(spec, str):
            raise _refuse(f"numpy.dtype({spec!r})")
        try:
            self.dtype = np.dtype(spec)
        except TypeError:
            raise _refuse(f"numpy.dtype({spec!r})") from None
        if self.dtype.kind not in NUMERIC_KINDS or self.dtype.fields or self.dtype.subdtype:
            raise _refuse(f"numpy.dtype({spec!r}) (only numbers)")

    def __setstate__(self, state: object) -> None:
        """numpy's state tuple ``(version, byte order, ...)``: only the byte order is used."""
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


def _as_bytes(data: object) -> bytes:
    """Raw bytes of a number or array (Python 2 pickles hand them over as latin1 ``str``)."""
    if isinstance(data, str):
        return data.encode("latin1")
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    raise _refuse(f"numpy data of type {type(data).__name__}")


def _dtype_of(value: object) -> np.dtype:
    if not isinstance(value, _DType):
        raise _refuse(f"numpy data with dtype {value!r}")
    return value.dtype


def _scalar(dtype: object, data: object) -> Any:
    """``numpy.core.multiarray.scalar``: one number from its raw bytes."""
    return np.frombuffer(_as_bytes(data), dtype=_dtype_of(dtype), count=1)[0]


def _shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise _refuse(f"numpy array shape {shape!r}")
    return shape


class _NDArrayType:
    """Stands in for the ``numpy.ndarray`` class (only as ``_reconstruct``'s argument)."""


class _ArrayState:
    """What ``_reconstruct`` returns; numpy's ``__setstate__`` tuple fills in the array."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise _refuse("numpy array state")
        _, shape, dtype, fortran, raw = state
        flat = np.frombuffer(_as_bytes(raw), dtype=_dtype_of(dtype))
        self.array = flat.reshape(_shape(shape), order="F" if fortran else "C")


def _reconstruct(cls: object, shape: object, typecode: object) -> _ArrayState:
    """``numpy.core.multiarray._reconstruct`` for a plain ndarray (pickle protocols 0-4)."""
    if not isinstance(cls, _NDArrayType):
        raise _refuse(f"numpy _reconstruct of {cls!r}")
    return _ArrayState()


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """``numpy.core.numeric._frombuffer`` (pickle protocol 5, in-band buffers)."""
    if order not in ("C", "F"):
        raise _refuse(f"numpy array order {order!r}")
    flat = np.frombuffer(_as_bytes(buffer), dtype=_dtype_of(dtype))
    return flat.reshape(_shape(shape), order=order)


def _latin1(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode``, which Python 3 protocol-2 pickles use for bytes: latin1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


_NDARRAY = _NDArrayType()
# (module, name) -> what it loads as. numpy >= 2 writes numpy._core.*, older numpy numpy.core.*.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): _DType,
    ("numpy", "ndarray"): _NDARRAY,
    ("_codecs", "encode"): _latin1,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _scalar
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _frombuffer


class _PlainUnpickler(pickle.Unpickler):
    """Loads built-in containers and scalars plus numpy numbers and arrays of numbers.

    Every class lookup is refused except numpy's scalar/array reconstructors, which resolve to
    local stand-ins that only turn raw bytes of a numeric dtype into numbers (no numpy code
    that could build objects is reached); ``_codecs.encode`` is allowed for latin1 only.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _refuse(f"{module}.{name}") from None


def _resolve(value: Any) -> Any:
    """Replace the unpickler's stand-ins by what they stand for."""
    if isinstance(value, _ArrayState):
        if value.array is None:
            raise pickle.UnpicklingError("numpy array without its state")
        return value.array
    if isinstance(value, _DType):
        return value.dtype
    if isinstance(value, dict):
        return {_resolve(k): _resolve(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_resolve(v) for v in value)
    return value


def _number(value: Any) -> float | None:
    """``value`` as a float when it is one real number (numpy scalars, 1-element arrays)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def speaker_of(file_name: str) -> str:
    """The YouTube id of a clip: its name up to the last ``.`` segment.

    ``-AmMDnVl4s8.003.mp4`` -> ``-AmMDnVl4s8``.
    """
    stem = file_name.removesuffix(".mp4")
    return stem.rsplit(".", 1)[0] if "." in stem else stem


def load_annotations(path: str | os.PathLike[str]) -> dict[str, list[float]]:
    """Read one annotation pickle safely: ``{video file name: scores in TRAITS order}``."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "annotation file not found")
    try:
        with open(path, "rb") as f:
            data = _resolve(_PlainUnpickler(f, encoding="latin1").load())
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        RecursionError,
    ) as exc:
        raise MediaError(path, f"not a plain annotation pickle: {exc}") from None
    if not isinstance(data, dict):
        raise MediaError(path, f"expected a dict of traits, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in TRAITS and k not in IGNORED_KEYS)
    if unknown:
        log.warning("%s: ignoring unknown keys %s", path, unknown)
    videos: set[str] | None = None
    for trait in TRAITS:
        scores = data.get(trait)
        if not isinstance(scores, dict):
            raise MediaError(path, f"no {trait} scores")
        names = set(scores)
        if videos is not None and names != videos:
            odd = sorted(names ^ videos)[:3]
            raise MediaError(path, f"{trait} scores cover other videos than {TRAITS[0]}: {odd}")
        videos = names
    result: dict[str, list[float]] = {}
    for video in sorted(videos or ()):
        if not isinstance(video, str):
            raise MediaError(path, f"video name {video!r} is not a string")
        targets = []
        for trait in TRAITS:
            value = _number(data[trait][video])
            if value is None:
                shown = data[trait][video]
                raise MediaError(path, f"{video}: {trait} score {shown!r} is not a number")
            if not 0.0 <= value <= 1.0:
                raise MediaError(path, f"{video}: {trait} score {value} outside [0, 1]")
            targets.append(value)
        result[video] = targets
    return result


def _find_annotation(directory: Path, name: str) -> Path | None:
    direct = directory / name
    if direct.is_file():
        return direct
    return next(iter(sorted(directory.rglob(name))), None)


def prepare_firstimpressions(
    root: Path,
    out_dir: Path,
    *,
    annotations_dir: Path | None = None,
    split: SplitMode = "auto",
    mode: LinkMode = "symlink",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Index First Impressions videos with their trait targets; write the manifest.

    Args:
        root: directory searched recursively for ``*.mp4``.
        annotations_dir: where the pickles are (searched recursively); default ``root``.
        split: ``official`` keeps the pickles' train/val/test (all three needed); ``speaker``
            draws seeded speaker-independent splits; ``auto`` is official when all three
            pickles exist, else speaker.
        mode: how media outside ``out_dir`` is referenced (see ``place_media``).

    Annotated videos absent from ``root`` go to ``frame.attrs["missing"]``; videos without
    annotation are skipped and listed in ``frame.attrs["unannotated"]``.
    """
    root, out_dir = Path(root), Path(out_dir)
    require_dir(root, "First Impressions video")
    notes = Path(annotations_dir) if annotations_dir is not None else root
    require_dir(notes, "First Impressions annotation")
    found = {s: _find_annotation(notes, n) for s, n in ANNOTATION_FILES.items()}
    if split == "official":
        for s, path in found.items():
            if path is None:
                raise MediaError(notes / ANNOTATION_FILES[s], "annotation file not found")
    elif split not in ("auto", "speaker"):
        raise ValueError(f"split: expected auto, official or speaker, got {split!r}")
    present = {s: p for s, p in found.items() if p is not None}
    if not present:
        names = ", ".join(ANNOTATION_FILES.values())
        raise MediaError(notes, f"no annotation pickles ({names})")
    official = split == "official" or (split == "auto" and len(present) == len(ANNOTATION_FILES))

    targets: dict[str, list[float]] = {}
    origin: dict[str, str] = {}
    for s, path in present.items():
        for video, values in load_annotations(path).items():
            if video in targets:
                raise MediaError(path, f"{video} is also annotated for {origin[video]}")
            targets[video], origin[video] = values, s

    videos: dict[str, Path] = {}
    for path in sorted(root.rglob("*.mp4")):
        if path.name in videos:
            raise MediaError(path, f"same file name as {videos[path.name]}")
        videos[path.name] = path
    missing = sorted(v for v in targets if v not in videos)
    unannotated = sorted(v for v in videos if v not in targets)
    if unannotated:
        log.warning("firstimpressions: %d videos have no annotation", len(unannotated))
    usable = sorted(v for v in targets if v in videos)

    speakers = {v: speaker_of(v) for v in usable}
    if official:
        assigned = {v: origin[v] for v in usable}
    else:
        by_speaker = assign_speaker_splits(list(speakers.values()), fractions, seed)
        assigned = {v: by_speaker[speakers[v]] for v in usable}
        log.info("firstimpressions: seeded speaker-independent splits (seed %d)", seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        ManifestRow(
            clip_id=video.removesuffix(".mp4"),
            path=place_media(
                videos[video], out_dir, videos[video].relative_to(root).as_posix(), mode
            ),
            dataset=DATASET,
            speaker=speakers[video],
            split=assigned[video],
            targets=targets[video],
            extra={"annotation": ANNOTATION_FILES[origin[video]]},
        )
        for video in usable
    ]
    write_manifest(rows, out_dir)
    frame = read_manifest(out_dir)
    shared = check_disjoint(frame)
    if shared:
        log.warning(
            "firstimpressions: the official split shares %d YouTube ids between splits "
            "(use split='speaker' for speaker-independent splits)",
            len(shared),
        )
    log.info("firstimpressions: %d clips in %s", len(rows), out_dir)
    frame.attrs["unannotated"] = unannotated
    return report_missing(frame, missing, DATASET)

"""Video files -> predictions and embeddings: the one inference path shared by the CLI
(``socialmae predict`` / ``embed``), the MLflow pyfunc model and serving.

A :class:`Predictor` holds a fine-tuned :class:`~socialmae.model.SocialMAEClassifier` and the
preprocessing its weights expect: the model config (fbank statistics, channel order, input
sizes), the face-crop settings and the frame/audio sampling. Each file goes through
:func:`socialmae.data.load_clip`, exactly as in training; a file that cannot be used
yields a row whose ``error`` is the :class:`~socialmae.data.errors.MediaError` reason while
the rest of the batch is still predicted.

A model directory may hold ``preprocessing.json`` (written by :func:`write_preprocessing`)
next to ``config.json`` with the ``crop`` and ``sampling`` settings used in training; without
it the defaults apply. The fbank statistics are the ones in the model config
(``config.json``), unless :meth:`Predictor.load` is given others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import Progress

from socialmae.checkpoints import CheckpointError, load_checkpoint
from socialmae.data.crop import CropParams, build_detector
from socialmae.data.errors import MediaError
from socialmae.data.faces import FaceDetector
from socialmae.data.inputs import load_clip
from socialmae.data.sampling import ClipSampling
from socialmae.io import atomic_write_text
from socialmae.model.config import SocialMAEConfig
from socialmae.model.social_mae import MODES, Mode, SocialMAEClassifier, Task
from socialmae.params import ParamsError, from_mapping

logger = logging.getLogger(__name__)

PREPROCESSING_NAME = "preprocessing.json"
PATH_COLUMN = "path"
LABEL_COLUMN = "label"
ERROR_COLUMN = "error"


NEEDS: dict[str, Literal["both", "audio", "video"]] = {
    "multimodal": "both", "audio": "audio", "video": "video",
}  # fmt: skip  # the streams each mode reads: a voice-only file is enough for ``audio``


@dataclass(frozen=True)
class Preprocessing:
    """How a video file becomes model inputs for one model."""

    config: SocialMAEConfig  # input sizes, fbank statistics, channel order
    crop: CropParams  # face detection, tracking and cropping
    sampling: ClipSampling  # which frames and audio window

    def __post_init__(self) -> None:
        if self.crop.image_size < self.config.image_size:  # larger crops are resized down
            raise ValueError(
                f"crop.image_size {self.crop.image_size} is smaller than the model's "
                f"image_size {self.config.image_size}: faces would be upsampled"
            )


@dataclass(frozen=True)
class Prediction:
    """The model's output for one file."""

    path: str
    label: str | None  # most probable class; None for regression or on error
    scores: dict[str, float]  # class -> probability (softmax), or trait -> score; {} on error
    error: str | None = None  # why the file could not be used

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Embeddings:
    """Pooled encoder embeddings of a list of files, aligned with the input order."""

    paths: list[str]
    vectors: np.ndarray  # [N, D] float32; rows of unusable files are NaN
    errors: list[str | None]  # per file: None, or the reason it could not be used

    @property
    def ok(self) -> np.ndarray:
        """``[N]`` bool: which rows hold an embedding."""
        return np.array([e is None for e in self.errors], dtype=bool)


def write_preprocessing(
    directory: str | os.PathLike[str],
    crop: CropParams | None = None,
    sampling: ClipSampling | None = None,
) -> Path:
    """Record the crop and sampling settings next to a saved model (``preprocessing.json``)."""
    data = {
        "crop": dataclasses.asdict(crop or CropParams()),
        "sampling": dataclasses.asdict(sampling or ClipSampling()),
    }
    return atomic_write_text(Path(directory) / PREPROCESSING_NAME, json.dumps(data, indent=2))


def read_preprocessing(
    directory: str | os.PathLike[str],
) -> tuple[CropParams | None, ClipSampling | None]:
    """The settings of :func:`write_preprocessing`, or ``(None, None)`` when absent."""
    path = Path(directory) / PREPROCESSING_NAME
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        crop = from_mapping(CropParams, data.get("crop"), "crop")
        sampling = from_mapping(ClipSampling, data.get("sampling"), "sampling")
    except (ValueError, ParamsError) as exc:
        raise CheckpointError(path, f"invalid preprocessing file ({exc})") from exc
    return crop, sampling


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available")
    return dev


class Predictor:
    """A fine-tuned model plus its preprocessing: files in, predictions or embeddings out."""

    def __init__(
        self,
        model: SocialMAEClassifier,
        preprocessing: Preprocessing | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(model, SocialMAEClassifier):
            raise TypeError(f"a Predictor needs a SocialMAEClassifier, got {type(model).__name__}")
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        self.preprocessing = preprocessing or Preprocessing(
            config=model.config,
            crop=CropParams(workers=1, device=str(self.device)),
            sampling=ClipSampling(),
        )
        self._detector: FaceDetector | None = None

    @property
    def detector(self) -> FaceDetector:
        """This predictor's face detector, built on first use from its crop settings (its
        weights, threshold and device; never shared with another predictor)."""
        if self._detector is None:
            self._detector = build_detector(self.preprocessing.crop)
        return self._detector

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        task: Task | None = None,
        labels: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        crop: CropParams | None = None,
        sampling: ClipSampling | None = None,
        fbank_stats: tuple[float, float] | None = None,
    ) -> Predictor:
        """Load a fine-tuned model with its preprocessing.

        Args:
            path: a ``save_pretrained`` directory (which records task, labels and config, and
                may hold ``preprocessing.json``) or an official fine-tuned ``.pth``.
            task, labels: ``classification``/``regression`` and the output names, for
                ``.pth`` files, which record neither.
            crop, sampling: override the stored (or default) settings.
            fbank_stats: ``(mean, std)`` overriding the model config's fbank statistics.
        """
        path = Path(path)
        model = load_checkpoint(path, task, tuple(labels) if labels is not None else None)
        if not isinstance(model, SocialMAEClassifier):
            raise CheckpointError(path, "is a pretraining checkpoint; predictions need a "
                                  "fine-tuned one")  # fmt: skip
        if path.is_dir() and labels is not None and tuple(labels) != model.labels:
            logger.warning("%s records labels %s; ignoring %s", path, model.labels, labels)
        dev = _device(device)
        stored_crop, stored_sampling = read_preprocessing(path) if path.is_dir() else (None, None)
        if crop is None:  # workers and device are runtime choices, not part of the contract
            base = stored_crop or CropParams()
            crop = dataclasses.replace(base, workers=1, device=str(dev))
        config = model.config
        if fbank_stats is not None:
            config = config.replace(fbank_mean=fbank_stats[0], fbank_std=fbank_stats[1])
        preprocessing = Preprocessing(config, crop, sampling or stored_sampling or ClipSampling())
        return cls(model, preprocessing, dev)

    # ---------------------------------------------------------------- what it outputs

    @property
    def task(self) -> Task:
        return self.model.task

    @property
    def labels(self) -> tuple[str, ...]:
        """Class or trait names (``output_<i>`` when the checkpoint recorded none)."""
        if self.model.labels is not None:
            return self.model.labels
        return tuple(f"output_{i}" for i in range(self.model.num_outputs))

    @property
    def score_columns(self) -> list[str]:
        """Per-output columns of :meth:`to_frame`: ``prob_<class>`` or ``score_<trait>``."""
        prefix = "prob_" if self.task == "classification" else "score_"
        return [prefix + name for name in self.labels]

    # ---------------------------------------------------------------- running

    def _run(
        self,
        paths: Sequence[str | os.PathLike[str]],
        mode: Mode | None,
        batch_size: int,
        progress: bool,
        embed: bool,
    ) -> tuple[np.ndarray, list[str | None]]:
        """Outputs ``[N, K]`` (logits, or embeddings when ``embed``; NaN rows on error) in
        ``mode`` (None: the mode the model was fine-tuned in)."""
        mode = mode or self.model.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pre = self.preprocessing
        width = self.model.config.embed_dim if embed else self.model.num_outputs
        out = np.full((len(paths), width), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(paths)
        console = Console(stderr=True)  # stdout stays clean for piped JSON/CSV
        with Progress(transient=True, disable=not progress, console=console) as bar:
            job = bar.add_task("embedding" if embed else "predicting", total=len(paths))
            for start in range(0, len(paths), batch_size):
                rows, clips = [], []
                for i in range(start, min(start + batch_size, len(paths))):
                    try:
                        clips.append(load_clip(
                            paths[i], pre.config, pre.crop, pre.sampling, need=NEEDS[mode],
                            detector=self.detector if NEEDS[mode] != "audio" else None,
                        ))  # fmt: skip
                        rows.append(i)
                    except MediaError as exc:
                        errors[i] = exc.reason
                        logger.warning("skipping %s: %s", paths[i], exc.reason)
                    bar.advance(job)
                if not clips:
                    continue
                audio = video = None
                if mode != "video":
                    audio = torch.stack([c.audio for c in clips]).to(self.device)  # [b, 1024, 128]
                if mode != "audio":
                    video = torch.stack([c.video for c in clips]).to(self.device)  # [b, 3, T, H, W]
                with torch.inference_mode():
                    if embed:
                        y = self.model.embed(audio, video, mode)  # [b, D]
                    else:
                        y = self.model(audio, video, mode)  # [b, K]
                out[rows] = y.float().cpu().numpy()
        return out, errors

    def predict(
        self,
        paths: Sequence[str | os.PathLike[str]],
        mode: Mode | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[Prediction]:
        """Predict every file; unusable files get a :class:`Prediction` with ``error`` set.

        Classification scores are softmax probabilities; regression scores are the raw outputs.
        """
        logits, errors = self._run(paths, mode, batch_size, progress, embed=False)  # [N, K]
        names = self.labels
        if self.task == "classification":
            scores = torch.from_numpy(logits).softmax(dim=-1).numpy()  # NaN rows stay NaN
        else:
            scores = logits
        predictions = []
        for path, row, error in zip(paths, scores, errors, strict=True):
            if error is not None:
                predictions.append(Prediction(str(path), None, {}, error))
                continue
            values = {name: float(v) for name, v in zip(names, row, strict=True)}
            label = names[int(row.argmax())] if self.task == "classification" else None
            predictions.append(Prediction(str(path), label, values))
        return predictions

    def to_frame(self, predictions: Sequence[Prediction]) -> pd.DataFrame:
        """Predictions -> one row per file: ``path``, ``label``, ``error`` and the
        :attr:`score_columns` (NaN on error rows)."""
        columns: dict[str, pd.Series] = {
            PATH_COLUMN: pd.Series([p.path for p in predictions], dtype=object),
            LABEL_COLUMN: pd.Series([p.label for p in predictions], dtype=object),
            ERROR_COLUMN: pd.Series([p.error for p in predictions], dtype=object),
        }
        for name, column in zip(self.labels, self.score_columns, strict=True):
            values = [p.scores.get(name, math.nan) for p in predictions]
            columns[column] = pd.Series(values, dtype="float64")
        return pd.DataFrame(columns)

    def predict_frame(
        self,
        paths: Sequence[str | os.PathLike[str]],
        mode: Mode | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> pd.DataFrame:
        """:meth:`predict` as a DataFrame (see :meth:`to_frame`)."""
        return self.to_frame(self.predict(paths, mode, batch_size, progress))

    def embed(
        self,
        paths: Sequence[str | os.PathLike[str]],
        mode: Mode | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> Embeddings:
        """Pooled encoder embeddings ``[N, D]`` of every file (NaN rows where ``errors`` say
        why)."""
        vectors, errors = self._run(paths, mode, batch_size, progress, embed=True)
        return Embeddings([str(p) for p in paths], vectors, errors)

"""The data overview (notebook 01): manifests and splits, the per-clip table, validation and
quarantine, class balance, and face crops with their fbank.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from socialmae.data.clips import CLIPS_TABLE
from socialmae.data.manifest import MANIFEST_NAME, SPLITS, read_manifest
from socialmae.data.shards import ShardReader
from socialmae.layout import FACES, RAW, VALIDATION

if TYPE_CHECKING:
    from matplotlib.figure import Figure


logger = logging.getLogger(__name__)


def read_manifests(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Every ``data/raw/<dataset>/manifest.parquet`` of the project, concatenated."""
    paths = sorted((Path(root) / RAW).glob(f"*/{MANIFEST_NAME}"))
    frames = [read_manifest(p) for p in paths]
    if not frames:
        return pd.DataFrame(columns=["clip_id", "dataset", "speaker", "split", "label"])
    return pd.concat(frames, ignore_index=True)


def split_summary(manifest: pd.DataFrame) -> pd.DataFrame:
    """Clips, speakers and labels per (dataset, split), splits in train/val/test order."""
    summary = manifest.groupby(["dataset", "split"]).agg(
        clips=("clip_id", "size"),
        speakers=("speaker", "nunique"),
        labels=("label", lambda labels: labels[labels != ""].nunique()),
    )
    order = {name: i for i, name in enumerate(SPLITS)}
    return summary.sort_index(key=lambda idx: idx.map(lambda v: order.get(v, v)))


def read_clips(root: str | os.PathLike[str]) -> pd.DataFrame:
    """The per-clip table ``crop_faces`` wrote (``data/interim/faces/clips.parquet``)."""
    return pd.read_parquet(Path(root) / FACES / CLIPS_TABLE)


def read_validation(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``validate`` stage's ``metrics.json``: counts, reasons and the checks' outcomes."""
    return json.loads((Path(root) / VALIDATION / "metrics.json").read_text())


def quarantine_reasons(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Quarantined clips per reason (a clip with several reasons counts under each)."""
    table = pd.read_csv(Path(root) / VALIDATION / "quarantine.csv", dtype=str).fillna("")
    reasons = table["reason"].str.split("; ").explode()
    reasons = reasons[reasons.fillna("") != ""]
    counts = reasons.value_counts().rename_axis("reason").rename("clips")
    return counts.reset_index()


def class_balance(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Accepted clips per class: rows (dataset, split), one column per class."""
    balance = json.loads((Path(root) / VALIDATION / "balance.json").read_text())
    rows = {
        (dataset, split): counts
        for dataset, block in (balance.get("datasets") or {}).items()
        for split, counts in (block.get("counts") or {}).items()
    }
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame.from_dict(rows, orient="index").fillna(0).astype(int)
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["dataset", "split"])
    return frame.sort_index()


def pick_clips(clips: pd.DataFrame, limit: int = 6, split: str | None = None) -> pd.DataFrame:
    """Up to ``limit`` clips in shards: one per (dataset, label) first, each from the speaker
    shown least so far, so that the picks show different people; deterministic."""
    table = clips[clips["status"] == "ok"]
    if split is not None:
        table = table[table["split"] == split]
    table = table.sort_values("clip_id", kind="stable")
    turn = table.groupby("speaker", sort=False).cumcount()  # n-th clip of its speaker
    table = table.assign(_turn=turn).sort_values(["_turn", "speaker"], kind="stable")
    table = table.drop(columns="_turn").reset_index(drop=True)
    shown: dict[str, int] = {}
    first: list[int] = []
    for _, group in table.groupby(["dataset", "label"], sort=False):
        index = int(group["speaker"].map(lambda s: shown.get(s, 0)).idxmin())
        first.append(index)
        speaker = table.at[index, "speaker"]
        shown[speaker] = shown.get(speaker, 0) + 1
    rest = [i for i in table.index if i not in set(first)]
    return table.loc[first + rest].head(limit).reset_index(drop=True)


def plot_clip_distributions(
    clips: pd.DataFrame, thresholds: Mapping[str, float] | None = None
) -> Figure:
    """Histograms of duration, face detection rate and audio RMS, ok vs quarantined clips;
    ``thresholds`` (column -> value, e.g. the ``validate`` minimums) are drawn as lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3), layout="constrained")
    axes = fig.subplots(1, 3)
    columns = (("duration", "duration (s)"), ("detection_rate", "face detection rate"),
               ("audio_rms_db", "audio RMS (dBFS)"))  # fmt: skip
    for ax, (column, label) in zip(axes, columns, strict=True):
        groups = []
        for status in ("ok", "quarantined"):
            values = clips.loc[clips["status"] == status, column].astype(float)
            groups.append((status, values[np.isfinite(values)].to_numpy()))
        present = [(s, v) for s, v in groups if v.size]
        if present:
            ax.hist([v for _, v in present], bins=20, stacked=True,
                    label=[f"{s} ({v.size})" for s, v in present])  # fmt: skip
            ax.legend(fontsize=8)
        if thresholds and column in thresholds:
            ax.axvline(thresholds[column], color="red", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("clips")
    return fig


def plot_face_grid(
    shard_dir: str | os.PathLike[str], clips: pd.DataFrame, frames_per_clip: int = 4
) -> Figure:
    """One row per clip: ``frames_per_clip`` face crops spread over the clip (from its shard)
    and the log-mel fbank of its audio (the model's audio input, before padding)."""
    from matplotlib.figure import Figure

    if clips.empty:
        raise ValueError("no clips to show")
    k = frames_per_clip
    fig = Figure(figsize=(1.7 * k + 3.5, 1.9 * len(clips)), layout="constrained")
    axes = fig.subplots(len(clips), k + 1, squeeze=False, width_ratios=[1] * k + [2])
    readers: dict[str, ShardReader] = {}
    try:
        for r, row in enumerate(clips.itertuples(index=False)):
            if row.shard not in readers:
                readers[row.shard] = ShardReader(Path(shard_dir) / row.shard)
            reader = readers[row.shard]
            meta = reader.meta(row.clip_id)
            count = int(meta["frames"])
            for c, i in enumerate(np.linspace(0, count - 1, k).round().astype(int)):
                ax = axes[r, c]
                ax.imshow(reader.frame(row.clip_id, int(i)))
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlabel(f"{float(meta['times'][i]):.1f} s", fontsize=7)
            axes[r, 0].set_ylabel(f"{row.label or row.dataset}\n{row.split}", fontsize=8)
            axes[r, 0].set_title(row.clip_id, loc="left", fontsize=8)
            feats = reader.fbank(row.clip_id)[:1024]  # [T, 128]: the stored log-mel
            ax = axes[r, k]
            ax.imshow(feats.T, aspect="auto", origin="lower", cmap="magma")
            ax.set_xlabel("frame (10 ms)", fontsize=7)
            ax.set_ylabel("mel bin", fontsize=7)
            ax.tick_params(labelsize=6)
    finally:
        for reader in readers.values():
            reader.close()
    return fig

"""Pretraining views (notebook 02): loss curves and the paper's Fig. 2 for chosen clips."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from socialmae.data.dataset import ShardDataset
    from socialmae.model import SocialMAE


logger = logging.getLogger(__name__)


def plot_curves(
    frame: pd.DataFrame, x: str, panels: Mapping[str, Sequence[str]], title: str | None = None
) -> Figure:
    """One panel per entry of ``panels`` (title -> columns of ``frame``) against ``x``;
    columns ``frame`` lacks are skipped."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, columns) in zip(axes, panels.items(), strict=True):
        for column in columns:
            if column in frame:
                ax.plot(frame[x], frame[column], marker=".", label=column)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def reconstruction_figures(
    model: SocialMAE,
    dataset: ShardDataset,
    indices: Iterable[int],
    directory: str | os.PathLike[str],
    seed: int = 0,
    mask_ratio: float = 0.75,
) -> list[Path]:
    """The paper's Fig. 2 (original / masked / reconstructed frames, fbank beside them) for
    clips ``indices`` of ``dataset``, one PNG each in ``directory`` (the pretrain stage's
    figure code, so the notebook shows what ``reconstruction.png`` shows)."""
    from socialmae.figures import save_reconstruction_figure

    paths = []
    for n, index in enumerate(indices):
        item = dataset[index]
        row = dataset.table.iloc[index]
        label = f", {row['label']}" if row["label"] else ""
        path = Path(directory) / f"{n:02d}-{item['clip_id']}.png"
        save_reconstruction_figure(
            model, item["audio"][None], item["video"][None], path, seed=seed,
            mask_ratio=mask_ratio,
            title=f"{item['clip_id']} ({row['split']}{label}): original / masked / "
            "reconstructed",
        )  # fmt: skip
        paths.append(path)
    return paths

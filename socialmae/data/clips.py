"""The per-clip table that ``crop_faces`` writes and ``validate`` checks (``clips.parquet``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

Status = Literal["ok", "quarantined"]


@dataclass
class ClipRecord:
    """What face cropping measured for one manifest row.

    Attributes:
        clip_id, dataset, speaker, split, label: copied from the manifest.
        targets: regression targets (JSON list as text, ``"[]"`` when none).
        path: the source media file (absolute).
        status: ``ok`` when the clip is in a shard, ``quarantined`` otherwise.
        reason: why the clip was quarantined (empty when ok).
        duration: seconds of media used (the shorter of the streams).
        fps: average source frame rate; width, height: source frame size in pixels.
        frames: face frames stored in the shard (sampled at ``crop.frame_rate``).
        faces_max: most faces seen in one sampled frame.
        detection_rate: share of sampled frames where the main face was detected.
        box_size: median side of the main face's square crop box, in source pixels.
        sample_rate, channels: of the source audio stream (audio is stored at 16 kHz mono).
        audio_rms_db: RMS level of the stored audio in dBFS (-inf for digital silence).
        shard: file name of the shard holding the clip (empty when quarantined).
    """

    clip_id: str
    dataset: str
    speaker: str
    split: str
    label: str
    targets: str
    path: str
    status: Status
    reason: str = ""
    duration: float = 0.0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    frames: int = 0
    faces_max: int = 0
    detection_rate: float = 0.0
    box_size: float = 0.0
    sample_rate: int = 0
    channels: int = 0
    audio_rms_db: float = float("-inf")
    shard: str = ""


CLIP_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ClipRecord))
CLIPS_TABLE = "clips.parquet"

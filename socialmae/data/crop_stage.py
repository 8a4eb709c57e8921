"""The ``crop_faces`` stage: the manifest's clips, sorted, grouped into shards of
``crop.clips_per_shard``; the shard is the unit of work and of resume. A shard whose completion
marker (written last) holds the same signature (the params that shape the output, each clip's
path and content, the shard format) is not made again; the others go to the engine
(``crop.engine``: this machine's processes, :func:`~socialmae.data.crop.local_engine`, or a Ray
cluster, :func:`~socialmae.data.ray_crop.ray_engine`), which returns each finished shard; the
output is the same byte for byte whichever does the work. A clip that cannot be used is never
an error for the stage: it lands in the table as ``quarantined`` with its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
from rich.progress import Progress

from socialmae.data.clips import CLIP_COLUMNS, CLIPS_TABLE, ClipRecord
from socialmae.data.crop import (
    ClipResult,
    CropParams,
    Engine,
    ShardJob,
    local_engine,
    stage_detector,
)
from socialmae.data.shards import SHARD_FORMAT, write_shard
from socialmae.io import atomic_write, atomic_write_text, remove_temporaries

logger = logging.getLogger(__name__)


# how the work is spread, not what it produces
_UNSIGNED_PARAMS = ("workers", "engine", "ray_address", "actors_per_gpu")


def _signature(rows: pd.DataFrame, params: CropParams) -> str:
    """What a shard was made from: the shard format, the params that shape the output and each
    clip's id, path (:func:`portable_path`) and content. The content, not the modification
    time: the marker lives in the tracked output, so a source rewritten with the same bytes
    must leave it unchanged."""
    settings = {k: v for k, v in asdict(params).items() if k not in _UNSIGNED_PARAMS}
    h = hashlib.sha256(json.dumps({**settings, "format": SHARD_FORMAT}, sort_keys=True).encode())
    for clip_id, path in zip(rows["clip_id"], rows["abs_path"], strict=True):
        h.update(f"{clip_id}\0{portable_path(path)}\0{_file_digest(path)}\n".encode())
    return h.hexdigest()


def _file_digest(path: str) -> str:
    """BLAKE2b of the file's bytes (cheap next to decoding it), or ``missing``."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "blake2b").hexdigest()
    except FileNotFoundError:
        return "missing"


def _engine(params: CropParams) -> Engine:
    if params.engine == "ray":
        from socialmae.data.ray_crop import ray_engine

        return ray_engine
    return local_engine


def crop_faces(manifest: pd.DataFrame, out_dir: str | os.PathLike[str], params: CropParams) -> dict:
    """Run face cropping over a manifest (``read_manifest`` output, several datasets allowed).

    Writes ``out_dir/shard-NNNNN.tar`` (+ ``.parquet`` per-shard table and ``.json`` completion
    marker), ``out_dir/clips.parquet`` (every clip, ok or quarantined) and returns metrics.
    Shards are the unit of work and of resume: their names follow from the sorted manifest,
    and a shard whose marker holds the same signature is not made again. ``params.engine``
    says who does the work (this machine's processes, or a Ray cluster); the output is the
    same byte for byte.

    Raises:
        DetectorWeightsError: the detector's weights cannot be used (before any clip is read).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)  # a killed run's half-written shard or table
    rows = manifest.sort_values(["dataset", "clip_id"]).reset_index(drop=True)
    chunks = [
        rows.iloc[i : i + params.clips_per_shard]
        for i in range(0, len(rows), params.clips_per_shard)
    ]
    start = time.perf_counter()
    # weights checked (and converted or downloaded) once, up front, here
    stage_detector(replace(params, device="cpu") if params.engine == "ray" else params)
    jobs, skipped = [], 0
    for number, chunk in enumerate(chunks):
        name = f"shard-{number:05d}"
        signature = _signature(chunk, params)
        if _is_done(out, name, signature):
            skipped += len(chunk)
            continue
        jobs.append(ShardJob(name, chunk.to_dict("records"), signature))
    processed = 0
    if jobs:
        with Progress(transient=True) as progress:
            task = progress.add_task("cropping faces", total=len(rows), completed=skipped)
            for job, results in _engine(params)(jobs, params, lambda n: progress.advance(task, n)):
                _commit_shard(out, job, results)
                processed += len(results)
                logger.info("crop_faces: %s done (%d of %d clips)", job.name,
                            processed + skipped, len(rows))  # fmt: skip
    for stale in out.glob("shard-*.*"):
        if int(stale.name[6:11]) >= len(chunks):
            stale.unlink()
    table = pd.concat(
        [pd.read_parquet(out / f"shard-{n:05d}.parquet") for n in range(len(chunks))],
        ignore_index=True,
    ) if chunks else pd.DataFrame(columns=list(CLIP_COLUMNS))  # fmt: skip
    table["path"] = table["path"].map(portable_path)  # also in shards an older version wrote
    atomic_write(out / CLIPS_TABLE, lambda tmp: table.to_parquet(tmp, index=False))
    seconds = time.perf_counter() - start
    ok = table[table["status"] == "ok"]
    metrics = {
        "clips": len(table),
        "ok": len(ok),
        "quarantined": int((table["status"] != "ok").sum()),
        "processed": processed,
        "skipped_unchanged": skipped,
        "frames": int(ok["frames"].sum()) if len(ok) else 0,
        "seconds": round(seconds, 2),
        "clips_per_second": round(processed / seconds, 3) if processed and seconds else 0.0,
        "shards": len(chunks),
        "engine": params.engine,
    }
    for clip_id, reason in zip(table["clip_id"], table["reason"], strict=True):
        if reason:
            logger.warning("quarantined %s: %s", clip_id, reason)
    return metrics


def _is_done(out: Path, name: str, signature: str) -> bool:
    """Shard ``name`` is complete (its marker, written last, holds ``signature``)."""
    marker = out / f"{name}.json"
    try:
        done = json.loads(marker.read_text()).get("signature") == signature
    except (OSError, ValueError):
        return False
    return done and (out / f"{name}.parquet").is_file() and (out / f"{name}.tar").is_file()


def _commit_shard(out: Path, job: ShardJob, results: list[ClipResult]) -> None:
    """Write a finished shard: the tar, its clip table, then its completion marker."""
    records, samples = [], []
    for record, sample in results:
        records.append(record)
        if sample is not None:
            sample.meta["shard"] = record.shard = f"{job.name}.tar"
            samples.append(sample)
    write_shard(out / f"{job.name}.tar", samples)
    _write_table(records, out / f"{job.name}.parquet")
    marker = json.dumps({"signature": job.signature, "clips": len(records)}) + "\n"
    atomic_write_text(out / f"{job.name}.json", marker)


def _write_table(records: list[ClipRecord], path: Path) -> None:
    frame = pd.DataFrame([asdict(r) for r in records], columns=list(CLIP_COLUMNS))
    frame["path"] = frame["path"].map(portable_path)
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def portable_path(path: str) -> str:
    """``path`` relative to the working directory (the project root, where stages run) when it
    lies below it, else as it is: the clip table is a tracked output, and the checkout's
    location must not change its bytes."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path

"""The Ray engine of the ``crop_faces`` stage (``crop.engine: ray``): the same per-clip work as
the local engine, spread over a Ray cluster with Ray Data.

The pipeline, per group of ``crop.detector_clips`` consecutive clips of a shard (the local
engine's groups; one group per block, so a lost node costs only its groups):

1. a CPU task decodes the sampled frames and the audio (:func:`~socialmae.data.crop.decode_rows`);
2. an actor pool keeps RetinaFace loaded and detects faces, the group's frames sharing its
   batches (:func:`~socialmae.data.crop.detect_rows`; ``map_batches`` with a callable class;
   ``num_gpus`` per actor on GPUs, ``crop.actors_per_gpu`` actors sharing one);
3. a CPU task tracks the faces and crops them (:func:`~socialmae.data.crop.finish_rows`).

The driver (the stage's process) receives each clip's record and sample as it finishes and
hands a shard back to the stage as soon as all of its clips are in; the stage writes it and
its completion marker, so a killed driver loses only unfinished shards. Failed tasks are
retried (a dead worker node's tasks and actors move to the living nodes). Every node must see
the media files at the paths of the manifest and run the same ``socialmae`` installation.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from socialmae.data.crop import (
    ClipResult,
    CropParams,
    ShardJob,
    ShardResults,
    build_detector,
    decode_rows,
    detect_rows,
    detector_groups,
    finish_rows,
)

logger = logging.getLogger(__name__)

TASK_RETRIES = 5  # a task lost with its node, or killed, runs again elsewhere
ACTOR_RESTARTS = 5  # a detector actor lost with its node is started again elsewhere
PIPELINE_ATTEMPTS = 3  # runs of the whole pipeline for the groups not yet back


def _decode(item: dict[str, Any], params: CropParams) -> dict[str, Any]:
    """Step 1 (CPU task): ``state`` = the group's pickled :func:`decode_rows`."""
    state = decode_rows(pickle.loads(item["rows"]), params)
    return {"shard": item["shard"], "position": item["position"], "state": pickle.dumps(state)}


class _Detect:
    """Step 2 (actor): a RetinaFace detector kept loaded; ``state`` = :func:`detect_rows`."""

    def __init__(self, params: CropParams) -> None:
        import torch

        torch.set_num_threads(1)  # as in the local engine: the same numbers
        self.params = params
        self.detector = build_detector(params)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        states = [
            pickle.dumps(
                detect_rows(pickle.loads(packed), self.detector, self.params.detector_batch)
            )
            for packed in batch["state"]
        ]
        return {**batch, "state": np.array(states, dtype=object)}


def _finish(item: dict[str, Any], params: CropParams) -> dict[str, Any]:
    """Step 3 (CPU task): ``state`` = the group's pickled :func:`finish_rows`: ``(record,
    shard sample or None)`` per clip."""
    return {**item, "state": pickle.dumps(finish_rows(pickle.loads(item["state"]), params))}


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (``auto``, ``ray://head:10001``, ``host:6379``), or
    start one on this machine when None; True when this call started Ray (the caller shuts it
    down)."""
    import ray

    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Data's progress lines
    if address is None:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


def _detector_actors(params: CropParams) -> tuple[int, dict[str, Any]]:
    """How many detector actors, and the resources of each."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if params.device.startswith("cuda"):
        if not gpus:
            raise ValueError(f"crop.device is {params.device!r} but the Ray cluster has no GPU")
        return gpus * params.actors_per_gpu, {"num_gpus": 1 / params.actors_per_gpu}
    cpus = int(resources.get("CPU", 1))
    actors = max(1, min(params.workers, cpus - 1))  # leave a CPU to the decode and crop tasks
    if actors < params.workers:
        logger.warning("crop: %d detector actors (the cluster has %d CPUs)", actors, cpus)
    return actors, {"num_cpus": 1}


def _pipeline(items: list[dict[str, Any]], params: CropParams) -> Any:
    """The Ray Dataset of ``items`` (one group of clips each): decode, detect, crop."""
    import ray

    actors, actor_resources = _detector_actors(params)
    tasks = {"max_retries": TASK_RETRIES, "num_cpus": 1}
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map(_decode, fn_args=(params,), **tasks)
        .map_batches(
            _Detect,
            fn_constructor_args=(params,),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=TASK_RETRIES,
            **actor_resources,
        )
        .map(_finish, fn_args=(params,), **tasks)
    )


def ray_engine(
    jobs: list[ShardJob], params: CropParams, advance: Callable[[int], None]
) -> ShardResults:
    """Crop the clips of ``jobs`` on the Ray cluster at ``params.ray_address``; yields each
    shard's results (rows in manifest order) as soon as its last clip is in.

    Ray retries lost tasks and restarts lost actors; should the pipeline still fail (a node
    lost while an actor's result was in flight), it runs again for the groups not yet back, up
    to :data:`PIPELINE_ATTEMPTS` times."""
    import ray

    started = connect(params.ray_address)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.actor_task_retry_on_errors = [ray.exceptions.ActorUnavailableError]
        by_name = {job.name: job for job in jobs}
        pending: dict[str, dict[int, ClipResult]] = {job.name: {} for job in jobs}
        remaining = []  # one item per detector group; position: its first row's in the shard
        for job in jobs:
            position = 0
            for group in detector_groups(job.rows, params):
                rows = pickle.dumps(group)
                remaining.append({"shard": job.name, "position": position, "rows": rows})
                position += len(group)
        for attempt in range(1, PIPELINE_ATTEMPTS + 1):
            try:
                for row in _pipeline(remaining, params).iter_rows():
                    done = pending.get(row["shard"])
                    first = int(row["position"])
                    if done is None or first in done:
                        continue  # a group of an earlier attempt, already in
                    results: list[ClipResult] = pickle.loads(row["state"])
                    for offset, result in enumerate(results):
                        done[first + offset] = result
                    advance(len(results))
                    job = by_name[row["shard"]]
                    if len(done) == len(job.rows):
                        del pending[job.name]
                        yield job, [done[i] for i in range(len(job.rows))]
                break
            except ray.exceptions.RayError as exc:
                remaining = [
                    item
                    for item in remaining
                    if item["shard"] in pending and item["position"] not in pending[item["shard"]]
                ]
                if attempt == PIPELINE_ATTEMPTS:
                    raise
                logger.warning(
                    "crop: the Ray pipeline failed (%s: %s); again for the %d groups of clips "
                    "not yet back", type(exc).__name__, exc, len(remaining),
                )  # fmt: skip
        if pending:
            raise RuntimeError(f"Ray returned no result for some clips of {sorted(pending)}")
    finally:
        if started:
            ray.shutdown()

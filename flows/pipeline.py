"""The pipeline as a Prefect flow: each stage is one task running ``dvc repro --single-item
<stage>`` in the project root, in dvc.yaml's order, so DVC's cache and dvc.lock decide what
runs; with ``gpus > 1`` pretraining goes through ``torchrun`` and ``dvc commit``. A markdown
artifact summarises the metrics and promotion decisions.

    python -m flows.pipeline [ROOT] [--gpus N] [--ray-address ADDRESS]   # from the repository root
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from socialmae import orchestration
from socialmae.orchestration import CROP_STAGE, PRETRAIN_STAGE, RAY_ADDRESS_ENV, StageRun

PIPELINE_ARTIFACT = "socialmae-pipeline"


@task(task_run_name="{stage}", cache_policy=NO_CACHE)  # side effects: never cached
def repro(
    root: Path, stage: str, force: bool = False, env: dict[str, str] | None = None
) -> StageRun:
    """``dvc repro --single-item [--force] <stage>`` in ``root`` (``env`` added)."""
    return orchestration.repro(root, stage, force, log=get_run_logger(), env=env)


@task(task_run_name="pretrain (torchrun x{nproc})", cache_policy=NO_CACHE)
def pretrain_torchrun(root: Path, nproc: int, force: bool = False) -> StageRun:
    """``torchrun --nproc_per_node <nproc> -m socialmae.cli pretrain`` + ``dvc commit``."""
    return orchestration.pretrain_torchrun(root, nproc, force, log=get_run_logger())


@task(cache_policy=NO_CACHE)
def report(root: Path, tasks: Sequence[str], runs: Sequence[StageRun], title: str, key: str) -> str:
    """Publish the run's markdown summary as the artifact ``key``; returns the markdown."""
    markdown = orchestration.summary_markdown(root, tasks, runs, title)
    create_markdown_artifact(markdown, key=key, description=title)
    return markdown


def run_stages(
    root: Path,
    stages: Sequence[str],
    gpus: int = 1,
    force: Sequence[str] = (),
    download_retries: int = 2,
    retry_delay_seconds: float = 10.0,
    ray_address: str | None = None,
) -> list[StageRun]:
    """Run ``stages`` in order, one task each (call it inside a flow). ``force`` names stages
    re-run even when DVC finds them up to date; only ``download`` (the network) is retried;
    with ``ray_address``, ``crop_faces`` runs on that Ray cluster (the same output)."""
    unknown = sorted(set(force) - set(stages))
    if unknown:
        raise ValueError(f"force: {unknown} are not stages of this run ({list(stages)})")
    if gpus < 1 or download_retries < 0:
        raise ValueError(f"need gpus >= 1, download_retries >= 0; got {gpus}, {download_retries}")
    runs = []
    for stage in stages:
        forced = stage in force
        if stage == PRETRAIN_STAGE and gpus > 1:
            runs.append(pretrain_torchrun(root, gpus, forced))
        elif stage == CROP_STAGE and ray_address:
            runs.append(repro(root, stage, forced, {RAY_ADDRESS_ENV: ray_address}))
        elif stage == "download":
            retried = repro.with_options(retries=download_retries,
                                         retry_delay_seconds=retry_delay_seconds)  # fmt: skip
            runs.append(retried(root, stage, forced))
        else:
            runs.append(repro(root, stage, forced))
    return runs


@flow(name="socialmae-pipeline")
def pipeline(
    root: str = ".",
    gpus: int = 1,
    download_retries: int = 2,
    retry_delay_seconds: float = 10.0,
    force: list[str] | None = None,
    ray_address: str | None = None,
) -> list[StageRun]:
    """download -> crop_faces -> validate -> pretrain -> tune/finetune/register@task (each task
    in params.yaml), each through ``dvc repro``; ``gpus > 1`` pretrains under torchrun.

    Args:
        root: the project (dvc.yaml, params.yaml).
        gpus: processes for pretraining; above 1, ``torchrun --nproc_per_node gpus``.
        download_retries: retries of the download stage, ``retry_delay_seconds`` apart.
        force: stages to re-run even when up to date (``dvc repro --force``).
        ray_address: crop faces on this Ray cluster (``auto``, ``ray://head:10001``) instead
            of this machine's processes; the shards are the same byte for byte.
    """
    project = Path(root).resolve()
    tasks = orchestration.project_tasks(project)
    stages = orchestration.pipeline_stages(project, tasks)
    runs = run_stages(project, stages, gpus, force or (), download_retries, retry_delay_seconds,
                      ray_address)  # fmt: skip
    report(project, tasks, runs, "Social-MAE pipeline", PIPELINE_ARTIFACT)
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flows.pipeline [ROOT] [--gpus N] [--ray-address ADDRESS]``: one run."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=main.__doc__)
    parser.add_argument("root", nargs="?", default=".", help="the project (default: .)")
    parser.add_argument("--gpus", type=int, default=1, help="pretraining processes (torchrun)")
    parser.add_argument("--ray-address", help="crop faces on this Ray cluster")
    args = parser.parse_args(argv)
    pipeline(root=args.root, gpus=args.gpus, ray_address=args.ray_address)


if __name__ == "__main__":
    main()

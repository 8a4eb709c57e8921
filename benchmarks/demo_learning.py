"""Does the demo learn, and does pretraining help? Seeds x {pretrained, scratch}; prints JSON.

Builds the demo set exactly as `dvc repro` does (params.yaml: download.demo, crop, validate),
then for every seed: pretrains with ``pretrain`` params (seeded) and fine-tunes every mode of
``finetune`` (demo block) twice on the same clips, from that pretrained model and from scratch
(same seed, fbank statistics of the train split). Reports per mode and init the test F1 macro of
each seed with mean, spread and minimum; the pretraining's held-out reconstruction and
retrieval before/after; and the paired comparison pretrained vs scratch: the mean difference
over seeds, how many seeds it wins, and per seed the paired permutation p-value on the same test
clips.

    python benchmarks/demo_learning.py                   # seeds 0 1 2, about 5 minutes a seed
    python benchmarks/demo_learning.py --seeds 0 --modes audio --work /tmp/demo-bench
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from socialmae.data.stages import stage_crop_faces, stage_download, stage_validate
from socialmae.params import deep_merge, from_mapping, load_yaml
from socialmae.tasks import get_task
from socialmae.train import metrics, significance
from socialmae.train.evaluation import read_predictions
from socialmae.train.finetune import finetune_modes, mode_dir, with_overrides
from socialmae.train.pretrain import PretrainParams, pretrain
from socialmae.train.stages import accepted_clips, finetune_params

REPO = Path(__file__).resolve().parents[1]
INITS = ("pretrained", "scratch")


def build_demo(params_path: Path, work: Path) -> tuple[Path, set[str]]:
    """The demo's shards and accepted clips, made by the pipeline's own stage functions."""
    raw, faces, validation = work / "raw", work / "faces", work / "validation"
    if not (validation / "metrics.json").is_file():
        stage_download(params_path, raw)
        stage_crop_faces(params_path, raw, faces)
        stage_validate(params_path, raw, faces, validation)
    return faces, accepted_clips(validation)


def run_seed(
    params: dict[str, Any],
    faces: Path,
    accepted: set[str],
    work: Path,
    seed: int,
    modes: list[str],
    uri: str,
    inits: tuple[str, ...] = INITS,
) -> dict[str, Any]:
    """Pretrain with ``seed``, then fine-tune each init; returns tables and timings."""
    started = time.perf_counter()
    settings = from_mapping(
        PretrainParams, deep_merge(params.get("pretrain") or {}, {"seed": seed}), "pretrain"
    )
    pretrained = pretrain(settings, faces, work / f"pretrain-{seed}", accepted, uri)
    seconds = round(time.perf_counter() - started, 1)
    out: dict[str, Any] = {"pretrain": {"heldout": pretrained.get("heldout"), "seconds": seconds}}
    base = finetune_params(params, "demo", None)
    for init in inits:
        overrides: dict[str, Any] = {"seed": seed, "modes": modes}
        if init == "pretrained":
            overrides["init"] = str(work / f"pretrain-{seed}" / "model")
        else:
            overrides.update(init=None, fbank_stats="train")
        started = time.perf_counter()
        table = finetune_modes(
            with_overrides(base, overrides), "demo", faces, work / f"{init}-{seed}", accepted, uri
        )
        out[init] = {
            m: {"val": table[m]["val"]["f1_macro"], "test": table[m]["test"]["f1_macro"],
                "test_ci95": table[m]["test"]["f1_macro_ci95"]}
            for m in modes
        }  # fmt: skip
        out[init]["comparisons"] = table["comparisons"]
        out[init]["seconds"] = round(time.perf_counter() - started, 1)
    task = get_task("demo")
    out["pretrained_vs_scratch"] = {}
    for mode in modes if set(inits) == set(INITS) else ():
        ids, targets, ours = read_predictions(mode_dir(work / f"pretrained-{seed}", mode), task)
        ids_b, _, theirs = read_predictions(mode_dir(work / f"scratch-{seed}", mode), task)
        test = significance.paired_permutation_test(
            metrics.metric_function(task), targets, ours, theirs, 10_000, seed=seed,
            clip_ids_a=ids, clip_ids_b=ids_b,
        )  # fmt: skip
        out["pretrained_vs_scratch"][mode] = {"difference": test.difference,
                                              "p_value": test.p_value}  # fmt: skip
    return out


def summarise(
    runs: dict[int, dict[str, Any]], modes: list[str], inits: tuple[str, ...] = INITS
) -> dict[str, Any]:
    """Mean, spread and minimum of test F1 macro per init and mode; pretrained - scratch."""
    summary: dict[str, Any] = {}
    for init in inits:
        for mode in modes:
            values = np.array([r[init][mode]["test"] for r in runs.values()])
            summary[f"{init}/{mode}"] = {
                "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
                else 0.0, "min": float(values.min()), "max": float(values.max()),
            }  # fmt: skip
    for mode in modes if set(inits) == set(INITS) else ():
        diffs = np.array([r["pretrained_vs_scratch"][mode]["difference"] for r in runs.values()])
        summary[f"pretrained_minus_scratch/{mode}"] = {
            "mean": float(diffs.mean()), "wins": int((diffs > 0).sum()), "seeds": len(diffs),
        }  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=None, help="default: finetune modes")
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = load_yaml(args.params)
    modes = args.modes or list(finetune_params(params, "demo", None).modes)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        started = time.perf_counter()
        faces, accepted = build_demo(args.params, work)
        data_seconds = round(time.perf_counter() - started, 1)
        inits = tuple(args.inits)
        runs = {
            seed: run_seed(params, faces, accepted, work, seed, modes, uri, inits)
            for seed in args.seeds
        }
    chance = 1 / len(get_task("demo").labels)
    report = {"chance_f1": chance, "clips": len(accepted), "data_seconds": data_seconds,
              "summary": summarise(runs, modes, inits), "seeds": runs}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

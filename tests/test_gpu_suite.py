"""The GPU suite's code runs on every test run: `benchmarks/gpu_suite.py --smoke` on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration

SECTIONS = ("pretrain", "bf16_vs_fp32", "finetune", "ddp", "retinaface", "crop_and_loader")


@pytest.mark.slow  # 35 s: every section of the suite, small, on the CPU
def test_the_suite_runs_every_section_in_smoke_mode(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_suite.py"), "--smoke"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["smoke"] and report["device"] == "cpu"
    for name in SECTIONS:
        assert "error" not in report[name], (name, report[name].get("traceback"))
    pretrain = report["pretrain"]
    assert pretrain["largest_batch"] == 2 and pretrain["samples_per_second"] > 0
    assert report["bf16_vs_fp32"]["within_5_percent"]
    assert len(report["bf16_vs_fp32"]["losses"]["bf16"]) == 3
    assert report["ddp"]["gather_ok"] and report["ddp"]["backend"] == "gloo"
    assert set(report["retinaface"]["frames_per_second"]) == {"batch_1", "batch_2"}
    crop, loader = report["crop_and_loader"]["crop"], report["crop_and_loader"]["loader"]
    for clips in (1, 8):
        run = crop[f"detector_clips_{clips}"]
        assert run["clips"] == 12 and run["clips_per_second"] > 0
    assert crop["across_clips_speedup"] > 0
    assert loader["step_demand_clips_per_second"] == pretrain["samples_per_second"]

"""Orchestration helpers for the Prefect flows in ``flows/`` (nothing here imports Prefect).

The flows run every stage as ``dvc repro --single-item <stage>`` so that DVC's cache and
dvc.lock decide what runs; this module holds the stage order, the ``dvc`` / ``torchrun``
argument lists, a subprocess runner that streams output to a logger, and the markdown summary
of a run (pretraining metrics, fine-tuning test metrics, promotion decisions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from socialmae.params import ParamsError, load_yaml
from socialmae.tasks import TASKS

logger = logging.getLogger(__name__)

Log = logging.Logger | logging.LoggerAdapter
PRETRAIN_STAGE = "pretrain"  # the stage the flows may run under torchrun
CROP_STAGE = "crop_faces"  # the stage the flows may run on a Ray cluster
RAY_ADDRESS_ENV = "SOCIALMAE_CROP_RAY_ADDRESS"  # set: crop_faces runs on the Ray cluster there


class CommandError(RuntimeError):
    """A command exited non-zero; the message ends with its last output lines."""

    def __init__(self, command: Sequence[str], returncode: int, tail: Sequence[str]) -> None:
        self.command = tuple(command)
        self.returncode = returncode
        self.tail = tuple(tail)
        output = "\n".join(tail) or "(no output)"
        super().__init__(f"`{shlex.join(command)}` exited with {returncode}:\n{output}")


@dataclass(frozen=True)
class StageRun:
    """One stage as the flow ran it: ``ran`` is False when DVC found it up to date."""

    stage: str
    ran: bool
    seconds: float


def project_tasks(root: Path, params: str = "params.yaml") -> tuple[str, ...]:
    """The ``tasks`` of ``root/params`` (dvc.yaml makes tune/finetune/register@task of each)."""
    tasks = load_yaml(root / params).get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ParamsError("tasks", f"expected a non-empty list of task names, got {tasks!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ParamsError("tasks", f"unknown task {unknown[0]!r}; choose from {sorted(TASKS)}")
    return tuple(tasks)


def pipeline_stages(root: Path, tasks: Iterable[str], pretrain: bool = True) -> list[str]:
    """The stage names of ``root/dvc.yaml`` in run order: its single stages in file order
    (without ``pretrain`` when ``pretrain`` is False), then, for each task, its ``foreach``
    stages in file order (``tune@task``, ``finetune@task``, ``register@task``)."""
    spec = load_yaml(root / "dvc.yaml").get("stages") or {}
    single = [name for name, stage in spec.items() if "foreach" not in stage]
    single = [name for name in single if pretrain or name != PRETRAIN_STAGE]
    per_task = [name for name, stage in spec.items() if "foreach" in stage]
    return single + [f"{stage}@{task}" for task in tasks for stage in per_task]


def repro_args(stage: str, force: bool = False) -> list[str]:
    """``dvc repro`` of this one stage (its upstream stages are the flow's earlier tasks)."""
    return ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]


def torchrun_args(nproc: int) -> list[str]:
    """The pretrain stage's command on ``nproc`` local processes (one per GPU)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return ["torchrun", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "socialmae.cli", "pretrain"]  # fmt: skip


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment (plus ``extra``) with the running interpreter's scripts (dvc,
    torchrun, socialmae) first on PATH, so dvc.yaml's ``socialmae <stage>`` commands resolve
    to this install."""
    path = f"{_bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **(extra or {}), "PATH": path}


def _argv(command: Sequence[str]) -> list[str]:
    local = _bin_dir() / command[0]
    found = str(local) if local.is_file() else shutil.which(command[0])
    if found is None:
        raise FileNotFoundError(f"{command[0]}: not found next to {sys.executable} or on PATH")
    return [found, *command[1:]]


def run(
    command: Sequence[str],
    cwd: Path,
    log: Log = logger,
    tail: int = 40,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run ``command`` (an argument list, never a shell string) in ``cwd`` with ``env`` added
    to the environment, logging each output line as it comes; returns stdout and stderr
    together, raises :class:`CommandError`."""
    log.info("$ %s  (in %s)", shlex.join(command), cwd)
    lines: list[str] = []
    process = subprocess.Popen(
        _argv(command), cwd=cwd, env=command_env(env), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,  # its own process group: stopped as a whole below
    )  # fmt: skip
    assert process.stdout is not None
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            log.info("%s", lines[-1])
        process.wait()
    except BaseException:  # cancelled or interrupted: stop the stage too (and DVC's lock)
        _terminate(process, log)
        raise
    finally:
        process.stdout.close()
    if process.returncode:
        raise CommandError(command, process.returncode, lines[-tail:])
    return "\n".join(lines)


def _terminate(process: subprocess.Popen, log: Log, grace: float = 30.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
    log.warning("stopping `%s` (pid %d)", shlex.join(map(str, process.args)), process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def repro(
    root: Path,
    stage: str,
    force: bool = False,
    log: Log = logger,
    env: Mapping[str, str] | None = None,
) -> StageRun:
    """``dvc repro --single-item [--force] <stage>`` in ``root``, ``env`` added to the stage's
    environment."""
    start = time.monotonic()
    output = run(repro_args(stage, force), root, log, env=env)
    ran = f"Running stage '{stage}'" in output
    return StageRun(stage, ran, round(time.monotonic() - start, 2))


def up_to_date(root: Path, stage: str) -> bool:
    """Whether ``dvc status`` finds ``stage``'s deps, params and outs as dvc.lock records them."""
    command = ["dvc", "status", "--json", stage]
    done = subprocess.run(_argv(command), cwd=root, env=command_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise CommandError(command, done.returncode, done.stderr.splitlines()[-40:])
    return json.loads(done.stdout or "{}") == {}


def pretrain_torchrun(root: Path, nproc: int, force: bool = False, log: Log = logger) -> StageRun:
    """The pretrain stage on ``nproc`` processes: ``torchrun ... -m socialmae.cli pretrain`` in
    ``root``, then ``dvc commit --force pretrain`` so dvc.lock records what it wrote. Skipped,
    as ``dvc repro`` would, when the stage is up to date (unless ``force``)."""
    start = time.monotonic()
    if not force and up_to_date(root, PRETRAIN_STAGE):
        log.info("Stage '%s' didn't change, skipping torchrun", PRETRAIN_STAGE)
        return StageRun(PRETRAIN_STAGE, False, round(time.monotonic() - start, 2))
    run(torchrun_args(nproc), root, log)
    run(["dvc", "commit", "--force", PRETRAIN_STAGE], root, log)
    return StageRun(PRETRAIN_STAGE, True, round(time.monotonic() - start, 2))


# ----------------------------------------------------------------------------- the summary


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_number(v) for v in value) + "]"
    return str(value).replace("|", "/").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_number(v) for v in row) + " |" for row in rows]
    return lines


_PRETRAIN_KEYS = (
    "steps", "epochs", "clips", "world_size", "loss", "loss_mae_audio", "loss_mae_video",
    "loss_contrastive", "contrastive_accuracy", "seconds",
)  # fmt: skip


def summary_markdown(root: Path, tasks: Sequence[str], runs: Sequence[StageRun], title: str) -> str:
    """Markdown for a flow run: the outcome per task, the stages (ran or up to date), the
    pretraining metrics, each task's test metrics and its latest promotion decision."""
    ran = {r.stage for r in runs if r.ran}
    decisions = {t: _json(root / "outputs/register" / t / "decision.json") for t in tasks}
    lines = [f"# {title}", "", f"Project `{root}`.", "", "## Outcome", ""]
    for task in tasks:
        decision = decisions[task]
        if f"register@{task}" not in ran:
            lines.append(f"- `{task}`: not registered again (its inputs did not change).")
        elif decision is None:
            lines.append(f"- `{task}`: registered, but no decision.json was written.")
        else:
            verdict = ("promoted to champion" if decision.get("promoted")
                       else f"held; champion stays v{decision.get('champion')}")  # fmt: skip
            lines.append(f"- `{task}`: {decision.get('model_name')} v{decision.get('version')} "
                         f"{verdict} ({decision.get('reason')}).")  # fmt: skip

    lines += ["", "## Stages", ""]
    stage_rows = [(r.stage, "ran" if r.ran else "up to date", r.seconds) for r in runs]
    lines += _table(["stage", "result", "seconds"], stage_rows)

    pretrain = _json(root / "outputs/pretrain/metrics.json")
    lines += ["", "## Pretraining (`outputs/pretrain/metrics.json`)", ""]
    if pretrain is None:
        lines.append("No metrics yet.")
    else:
        keys = [k for k in _PRETRAIN_KEYS if k in pretrain]
        initial = [pretrain.get(f"initial_{k}", "") for k in keys]
        lines += _table(["", *keys], [("final", *(pretrain[k] for k in keys)),
                                      ("initial", *initial)])  # fmt: skip

    lines += ["", "## Fine-tuning: test split (`outputs/finetune/<task>/metrics.json`)", ""]
    rows = []
    for task in tasks:
        result = _json(root / "outputs/finetune" / task / "metrics.json")
        if result is None:
            rows.append((task, "", "", "", "", "no metrics yet"))
            continue
        primary = result.get("primary_metric", "")
        for mode in result.get("modes", []):
            test = result.get(mode, {}).get("test", {})
            others = ", ".join(
                f"{k} {_number(v)}" for k, v in test.items()
                if k != primary and "/" not in k and isinstance(v, int | float)
            )  # fmt: skip
            rows.append((task, mode, primary, test.get(primary),
                         test.get(f"{primary}_ci95", ""), others))  # fmt: skip
    lines += _table(["task", "mode", "metric", "value", "95% CI", "other test metrics"], rows)

    lines += ["", "## Promotion (`outputs/register/<task>/decision.json`)", ""]
    rows = []
    for task in tasks:
        d = decisions[task]
        if d is None:
            rows.append((task, "", "", "", "", "", "", "no decision yet"))
            continue
        this_run = "yes" if f"register@{task}" in ran else "no (earlier run)"
        rows.append((task, f"{d.get('model_name')} v{d.get('version')}", this_run,
                     d.get("outcome"), f"v{d.get('champion')}", d.get("challenger_score"),
                     d.get("champion_score"), d.get("reason")))  # fmt: skip
    lines += _table(["task", "challenger", "this run", "outcome", "champion",
                     "challenger score", "champion score", "reason"], rows)  # fmt: skip
    return "\n".join(lines) + "\n"

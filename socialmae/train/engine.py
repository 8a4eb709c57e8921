"""What pretraining and fine-tuning share: optimizer groups, schedules, precision, the batch
plan over ranks, per-sample seeds, and atomic resumable checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from socialmae.io import atomic_directory, atomic_write_text, remove_temporaries

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Report = Callable[[int, float], None]  # (epoch, validation metric) -> None; may raise to prune
Schedule = Literal["step", "cosine", "constant"]


@dataclass(frozen=True)
class OptimParams:
    """AdamW and its learning-rate schedule (shared by ``pretrain`` and ``finetune``)."""

    lr: float = 1e-4  # peak learning rate (encoder)
    weight_decay: float = 5e-7  # applied to weights with ndim >= 2 only
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = 0  # linear warm-up, in optimizer steps
    schedule: Schedule = "step"  # step: x gamma every step_epochs; cosine: to min_lr_ratio
    step_epochs: int = 5
    step_gamma: float = 0.5
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float | None = None  # max global gradient norm

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.step_epochs < 1:
            raise ValueError(f"step_epochs must be >= 1, got {self.step_epochs}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


# ----------------------------------------------------------------------------- parameter groups

_NO_DECAY = re.compile(r"(^|\.)(pos_embed\w*|modality_\w+|decoder_modality_\w+|mask_token)$")
_BLOCK = re.compile(r"^blocks_(a|v|u)\.(\d+)\.")


def layer_id(name: str, modality_depth: int, joint_depth: int) -> int:
    """Depth of a parameter for layer-wise decay: 0 = tokenizers, then blocks, last = head."""
    match = _BLOCK.match(name)
    if match:
        branch, index = match.group(1), int(match.group(2))
        return 1 + index + (modality_depth if branch == "u" else 0)
    if name.startswith(("patch_embed", "pos_embed", "modality_")):
        return 0
    return modality_depth + joint_depth + 1  # final norms and heads


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    head_prefix: str | None = None,
    head_lr: float | None = None,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: decay only on ``ndim >= 2`` weights (not positions/tokens), an optional
    head group with its own lr, and optional layer-wise lr decay over encoder depth.

    Every trainable parameter lands in exactly one group and no group is empty (the reference's
    fine-tuning script had an empty head group, so its head lr did nothing).
    """
    config = getattr(model, "config", None)
    m_depth = getattr(config, "modality_depth", 0)
    j_depth = getattr(config, "joint_depth", 0)
    top = m_depth + j_depth + 1
    groups: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = head_prefix is not None and name.startswith(head_prefix)
        decay = param.ndim >= 2 and not _NO_DECAY.search(name)
        depth = top if is_head else layer_id(name, m_depth, j_depth)
        scale = layer_decay ** (top - depth) if layer_decay and not is_head else 1.0
        group_lr = (head_lr if is_head and head_lr is not None else lr) * scale
        kind = "head" if is_head else "encoder"
        key = (kind, depth if layer_decay else 0, decay)
        group = groups.setdefault(
            key,
            {"params": [], "names": [], "lr": group_lr, "initial_lr": group_lr,
             "weight_decay": weight_decay if decay else 0.0, "group": kind},
        )  # fmt: skip
        group["params"].append(param)
        group["names"].append(name)
    if head_prefix is not None and not any(g["group"] == "head" for g in groups.values()):
        raise ValueError(f"no trainable parameter starts with {head_prefix!r}: empty head group")
    return list(groups.values())


def build_optimizer(groups: list[dict[str, Any]], optim: OptimParams) -> torch.optim.AdamW:
    """AdamW over ``groups`` (names are kept for inspection, not passed to torch)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    fused = all(p.is_cuda for g in clean for p in g["params"])
    return torch.optim.AdamW(clean, lr=optim.lr, betas=optim.betas, fused=fused or None)


def lr_multiplier(step: int, steps_per_epoch: int, total_steps: int, optim: OptimParams) -> float:
    """Factor on each group's initial lr at optimizer step ``step`` (0-based)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return optim.step_gamma ** (epoch // optim.step_epochs)
    progress = (step - optim.warmup_steps) / max(total_steps - optim.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Apply ``multiplier`` to every group's ``initial_lr``; return the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
    return float(optimizer.param_groups[0]["lr"])


@dataclass
class OptimizerStep:
    """The optimizer step pretraining and fine-tuning share: loss scaling and backward, then
    per step the learning-rate schedule, unscaling and gradient clipping, the (scaled) step
    and zeroing the gradients."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    optim: OptimParams
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        optim: OptimParams,
        dtype: torch.dtype | None,
        device: torch.device,
        steps_per_epoch: int = 1,
        total_steps: int = 1,
        **groups: Any,
    ) -> OptimizerStep:
        """AdamW over :func:`param_groups` of ``model`` (``groups``: its head and layer-decay
        options), a scaler for ``dtype`` and the schedule of ``optim``."""
        optimizer = build_optimizer(
            param_groups(model, optim.lr, optim.weight_decay, **groups), optim
        )
        return cls(
            model, optimizer, grad_scaler(dtype, device), optim, steps_per_epoch, total_steps
        )

    def backward(
        self, loss: torch.Tensor, step: int, parts: dict[str, torch.Tensor], micro_steps: int = 1
    ) -> None:
        """Stop on a non-finite ``loss`` (scalar); else accumulate its gradients, divided
        over the ``micro_steps`` of one optimizer step."""
        check_finite(loss, step, parts)
        self.scaler.scale(loss / micro_steps if micro_steps > 1 else loss).backward()

    def step(self, step: int) -> float:
        """Take optimizer step ``step`` (0-based) with the scheduled lr; return that lr."""
        lr = set_lr(
            self.optimizer,
            lr_multiplier(step, self.steps_per_epoch, self.total_steps, self.optim),
        )
        if self.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr


# ----------------------------------------------------------------------------- precision


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """``auto`` = bf16 on CUDA, fp32 (no autocast) on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """A real scaler for fp16; a disabled one (a pass-through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# ----------------------------------------------------------------------------- data order


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (masks, augmentation)."""
    state = np.random.SeedSequence((seed, epoch, index)).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def sample_generators(
    seed: int, epoch: int, indices: Sequence[int], device: torch.device
) -> list[torch.Generator]:
    """One generator per sample, so its mask does not depend on how the batch is split."""
    device = torch.device("cpu") if device.type != "cuda" else device
    return [
        torch.Generator(device=device).manual_seed(sample_seed(seed, epoch, int(i)))
        for i in indices
    ]


class GlobalBatchSampler(torch.utils.data.Sampler[list[Any]]):
    """Yields this rank's share of each global batch, in a seeded per-epoch order.

    Global batch ``k`` of epoch ``e`` is ``perm_e[k*G:(k+1)*G]`` with ``G = world * batch``;
    rank ``r`` takes its ``r``-th slice. The last incomplete global batch is dropped when
    training (every rank must step together) and padded by nobody in evaluation (ranks may get
    fewer items). ``start`` skips batches already done in a resumed epoch. With ``with_epoch``
    the keys are ``(epoch, index)`` pairs, so a dataset in persistent loader workers (which
    never see ``set_epoch`` calls made in the main process) still knows the epoch.
    """

    def __init__(
        self,
        size: int,
        batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        with_epoch: bool = False,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.size, self.batch, self.rank, self.world = size, batch, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.with_epoch = with_epoch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        global_batch = self.batch * self.world
        full = self.size // global_batch
        return full if self.drop_last else math.ceil(self.size / global_batch)

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng((self.seed, self.epoch)).permutation(self.size)

    def __iter__(self) -> Iterator[list[Any]]:
        order = self.order()
        global_batch = self.batch * self.world
        for k in range(self.start, len(self)):
            chunk = order[k * global_batch : (k + 1) * global_batch]
            mine = chunk[self.rank * self.batch : (self.rank + 1) * self.batch]
            if len(mine):
                yield [(self.epoch, int(i)) if self.with_epoch else int(i) for i in mine]


# ----------------------------------------------------------------------------- checkpoints

TRAINER_STATE = "trainer.json"
OPTIMIZER_STATE = "optimizer.pt"
MODEL_STATE = "model.safetensors"


@dataclass
class Position:
    """Where a run is: optimizer steps done, and the epoch and batch to continue from."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def fingerprint(values: Any) -> str:
    """Short hash of JSON-able values (settings a checkpoint must agree with, test clips)."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


RUNTIME_CONFIG_FIELDS = ("use_sdpa", "activation_checkpointing")  # same numbers either way


def model_fingerprint(model: nn.Module) -> str:
    """Short hash of a model's configuration (without :data:`RUNTIME_CONFIG_FIELDS`) and its
    weights as they are now. Taken before training, it names the starting point (preset or
    init weights, seed, fbank statistics): checkpoints resume only onto the same one."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        values = {k: v for k, v in dataclasses.asdict(config).items()
                  if k not in RUNTIME_CONFIG_FIELDS}  # fmt: skip
        digest.update(json.dumps(values, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # socialmae/


@functools.cache
def code_fingerprint(root: Path = PACKAGE_ROOT) -> str:
    """Short hash of the code that trains: every ``.py`` file below ``root`` (the socialmae
    package). A checkpoint resumes only onto the same code, so a stage that DVC re-runs after a
    code change trains again instead of resuming the finished run of the old code."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resume_fingerprint(settings: Mapping[str, Any], model: nn.Module) -> str:
    """What a checkpoint must match to be resumed: ``settings`` (everything that changes the
    trajectory), the untrained ``model`` (:func:`model_fingerprint`: call it before the first
    step) and the code (:func:`code_fingerprint`)."""
    return fingerprint({**settings, "start": model_fingerprint(model), "code": code_fingerprint()})


def test_set_fingerprint(clip_ids: Iterable[str]) -> str:
    """Which test set a score is on: the hash of its sorted clip ids (``test_set`` in the
    finetune stage's metrics.json; the promotion gate compares these)."""
    return fingerprint(sorted(map(str, clip_ids)))


ASIDE_PREFIX = "aside-"  # checkpoints of other settings, kept until the new run saves its own


class Checkpointer:
    """Resumable state under ``directory/step-<n>/``, written atomically, newest ``keep`` kept.

    Each checkpoint holds the model weights (safetensors), the optimizer/scheduler/scaler state
    and RNG states (``torch.save`` of tensors and numbers, read back with ``weights_only``), and
    the position and settings fingerprint (JSON).
    """

    def __init__(self, directory: str | Path, fingerprint: str, keep: int = 2) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.keep = keep

    def _steps(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob("step-*") if (p / TRAINER_STATE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        position: Position,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write a checkpoint; ``extra`` (JSON) travels with it, e.g. the metric history."""

        def write(tmp: Path) -> None:
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, str(tmp / MODEL_STATE))
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                tmp / OPTIMIZER_STATE,
            )
            meta = {"fingerprint": self.fingerprint, **vars(position), "extra": extra or {}}
            (tmp / TRAINER_STATE).write_text(json.dumps(meta, indent=2) + "\n")

        path = atomic_directory(self.dir / f"step-{position.step:08d}", write)
        for old in self._steps()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for aside in self.dir.glob(f"{ASIDE_PREFIX}*"):  # this run has its own checkpoint now
            shutil.rmtree(aside, ignore_errors=True)
        atomic_write_text(self.dir / "latest", path.name + "\n")
        return path

    def latest(self) -> Path | None:
        """The newest complete checkpoint of these settings, or None.

        Checkpoints written with other settings are moved aside (``aside-<fingerprint>/``), not
        deleted, until this run has saved its own: a run that fails early, or goes back to the
        earlier settings, loses nothing (the set aside for these settings comes back). What
        a killed save left half-written is removed."""
        remove_temporaries(self.dir)
        steps = self._steps()
        if steps:
            meta = json.loads((steps[-1] / TRAINER_STATE).read_text())
            if meta.get("fingerprint") == self.fingerprint:
                return steps[-1]
            aside = self.dir / f"{ASIDE_PREFIX}{meta.get('fingerprint', 'unknown')}"
            logger.warning(
                "%s was written with other settings: moved aside to %s; starting from scratch",
                steps[-1], aside,
            )  # fmt: skip
            aside.mkdir(exist_ok=True)
            for stale in steps:
                stale.rename(aside / stale.name)
        mine = self.dir / f"{ASIDE_PREFIX}{self.fingerprint}"
        if mine.is_dir():  # these settings ran before: their checkpoints come back
            for kept in sorted(mine.glob("step-*")):
                kept.rename(self.dir / kept.name)
            shutil.rmtree(mine, ignore_errors=True)
            steps = self._steps()
            return steps[-1] if steps else None
        return None

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> tuple[Position, dict[str, Any]]:
        """Restore everything saved by :meth:`save`; returns the position and ``extra``."""
        model.load_state_dict(load_file(str(path / MODEL_STATE)))
        state = torch.load(path / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        meta = json.loads((path / TRAINER_STATE).read_text())
        position = Position(meta["step"], meta["epoch"], meta["batch_in_epoch"])
        logger.info("resumed from %s (step %d)", path, position.step)
        return position, meta.get("extra", {})


def check_finite(loss: torch.Tensor, step: int, parts: dict[str, torch.Tensor]) -> None:
    """Stop with a clear message on a NaN/inf loss (before it reaches the weights)."""
    if torch.isfinite(loss).all():
        return
    detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
    raise FloatingPointError(
        f"non-finite loss {loss.item()} at optimizer step {step} ({detail}); lower the learning "
        "rate, enable grad_clip, or use bf16 instead of fp16"
    )

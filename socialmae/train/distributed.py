"""Data parallelism: the same entry point under plain ``python`` and under ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; when
they are present the process group is initialised (NCCL on CUDA, gloo on CPU) and the model is
wrapped in DDP. Without them everything runs in one process with the same code path.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, checkpoints and writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device")
    return resolved


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistributedContext:
    """Join the ``torchrun`` job if there is one (idempotent); pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank if resolved.index is None else resolved.index)
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=None
        )
        logger.info("rank %d/%d joined (%s, %s)", rank, world_size, backend, resolved)
    return DistributedContext(rank, world_size, local_rank, resolved)


def teardown() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on every rank -> ``[W*B, ...]`` in rank order, gradients flowing back.

    The backward pass sums each rank's gradient for this rank's slice, so with DDP's gradient
    averaging a loss computed on the gathered batch gets the single-process gradient.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


def all_reduce_mean(values: Sequence[float], ctx: DistributedContext) -> list[float]:
    """Average plain numbers over ranks (for logging)."""
    if not ctx.distributed:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return (tensor / ctx.world_size).tolist()


def barrier(ctx: DistributedContext) -> None:
    if ctx.distributed:
        dist.barrier()


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
    """DDP's ``no_sync`` on gradient-accumulation micro-steps; a no-op otherwise."""
    if skip_sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield

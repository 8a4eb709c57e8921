"""Small helpers shared by test modules."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import torch


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group started with ``start_new_session``, SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    try:  # the leader is gone; its group may not be
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    process.wait(timeout=grace)


def tiny_inputs(
    batch: int = 2, frames: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised fbank ``[B, 1024, 128]`` and video ``[B, 3, T, 224, 224]``."""
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, 1024, 128, generator=g)
    video = torch.randn(batch, 3, frames, 224, 224, generator=g)
    return audio, video

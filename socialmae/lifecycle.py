"""Processes that do not outlive the process that started them.

A ``kill -9`` of ``dvc repro`` (a terminal's Ctrl-C twice, a CI cancel) or of a stage's main
process gives no chance to clean up: stage commands, crop workers and per-mode training
processes would keep running with PID 1 as their parent, holding memory and writing into
outputs. On Linux, ``prctl(PR_SET_PDEATHSIG)`` has the kernel signal them when their parent
dies; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; exit at once if
    the parent is already gone. Returns whether the request was made (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), sig)
    return True

"""The one exception type for unusable media and data files."""

from __future__ import annotations

import os


class MediaError(ValueError):
    """A clip or data file that cannot be used, naming the file and the reason.

    Stages catch it per clip, quarantine the clip with ``reason`` and go on.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, **facts: float) -> None:
        self.path = str(path)
        self.reason = reason
        self.facts = facts  # what was measured before the verdict (duration, detection_rate...)
        super().__init__(f"{path}: {reason}")

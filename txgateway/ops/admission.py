"""Who gets a connection on the side listeners (admin, Manhole): a cap, and descriptors kept
for the main listeners.

Without a bound, a few hundred slow admin or SSH connections hold as many descriptors, and
under a lowered RLIMIT_NOFILE the main listeners then fail to accept (EMFILE). Each side
listener takes at most `cap` connections at once, and none while fewer than a quarter of the
process's descriptors are free: the rest of the limit is the main listeners' reserve.
"""

from __future__ import annotations

import os
import resource
from typing import Any

__all__ = ["Admission", "descriptors_free"]

RESERVE = 0.25      # share of RLIMIT_NOFILE the side listeners never eat into


def descriptors_free() -> tuple[int, int]:
    """(descriptors not in use, the soft RLIMIT_NOFILE). Linux's /proc/self/fd; elsewhere the
    count is unknown and taken as 0 in use."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 0
    return soft - used, soft


class Admission:
    """The open connections of one side listener; `admit()` says whether one more may be."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open: set[Any] = set()

    def admit(self) -> bool:
        if len(self.open) >= self.cap:
            return False
        free, soft = descriptors_free()
        return free > soft * RESERVE

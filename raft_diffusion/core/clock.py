"""Where a run's compute goes: wall seconds since this process started, and its CPU seconds.

``metrics.jsonl`` reports both from process start, so the start-up (imports, loading the model and the
reward) is counted: what a user waits for and pays for, not only the stage loop.
"""

from __future__ import annotations

import os
import resource
import time

_IMPORTED = time.monotonic()  # the fallback origin where /proc cannot tell when the process started


def _started_seconds_ago() -> float | None:
    """Seconds since this process started, from /proc (Linux); None where that is not available."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): start time after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_AGE_AT_IMPORT = _started_seconds_ago()


def process_seconds() -> float:
    """Wall seconds since this process started (since this module was imported where /proc is missing)."""
    return (_AGE_AT_IMPORT or 0.0) + time.monotonic() - _IMPORTED


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of the child processes it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

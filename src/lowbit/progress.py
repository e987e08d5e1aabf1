"""Process-level helpers every long job shares: its peak memory, and a rich progress display that is
nothing at all when progress is off (quiet runs, tests, CI logs)."""

from __future__ import annotations


def peak_memory_mb() -> float:
    """This process's peak resident memory. On Linux VmHWM, because ru_maxrss survives exec and would
    report the parent's peak for a `lowbit quantize` started from a bigger process."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20


class OptionalProgress:
    """Context manager around an optional `rich.progress.Progress` in `self.p` (None: disabled)."""

    def __init__(self):
        self.p = None

    def __enter__(self):
        if self.p:
            self.p.start()
        return self

    def __exit__(self, *exc):
        if self.p:
            self.p.stop()

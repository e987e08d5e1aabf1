"""Process-level helpers every long job shares: its peak memory, and a progress display that is a rich
bar on a terminal, plain timestamped lines when the output is a log file (rich alone draws nothing there
until the end), and nothing at all when progress is off (quiet runs, tests)."""

from __future__ import annotations

import os
import sys
import threading
import time

# Seconds between progress lines when stderr is not a terminal (a log file, CI).
LOG_EVERY = float(os.environ.get("LOWBIT_PROGRESS_EVERY", "10"))


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


def log_line(text: str) -> None:
    """One progress line on stderr, stamped with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _task_line(task) -> str:
    total = f"/{task.total:g}" if task.total else ""
    fields = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in task.fields.items())
    return f"{task.description} {task.completed:g}{total}" + (f" ({fields})" if fields else "")


class OptionalProgress:
    """Context manager around an optional `rich.progress.Progress` in `self.p` (None: disabled).

    When the console is not a terminal, a daemon thread prints every task's state as one line every
    `LOG_EVERY` seconds when something changed, at least every 3·LOG_EVERY seconds, and once at the end.
    """

    def __init__(self):
        self.p = None
        self._stop = threading.Event()
        self._thread = None
        self._t0 = time.perf_counter()

    def _state(self) -> str:
        tasks = [t for t in self.p.tasks if t.visible]
        return " · ".join(_task_line(t) for t in tasks) + f" [{time.perf_counter() - self._t0:.0f} s]"

    def _ticker(self) -> None:
        """A line when the state changed since the last one, and at least every 3·LOG_EVERY seconds (a
        long step is still a sign of life in the log)."""
        last, quiet = None, 0.0
        while not self._stop.wait(LOG_EVERY):
            line = self._state()
            quiet += LOG_EVERY
            if line.split(" [")[0] != last or quiet >= 3 * LOG_EVERY:
                log_line(line)
                last, quiet = line.split(" [")[0], 0.0

    def __enter__(self):
        if self.p:
            if self.p.console.is_terminal:
                self.p.start()
            else:
                self._thread = threading.Thread(target=self._ticker, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.p:
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
                log_line(self._state() + (" (interrupted)" if exc[0] is not None else ""))
            else:
                self.p.stop()


class StepProgress(OptionalProgress):
    """One bar of `total` steps labelled `label`, with named numeric fields shown beside it
    (`update(loss=...)` advances one step). A no-op when disabled."""

    def __init__(self, label: str, total: int, enabled: bool = True, **fields: float):
        super().__init__()
        self.task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            cols = [TextColumn(f"{{task.fields[{k}]:.4g}} {k}") for k in fields]
            self.p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), *cols, TimeElapsedColumn(),
                              console=Console(stderr=True))
            self.task = self.p.add_task(label, total=total, **fields)

    def update(self, **fields: float) -> None:
        if self.p:
            self.p.update(self.task, advance=1, **fields)


def progress_iter(items, label: str, enabled: bool = True, total: int | None = None):
    """Iterate `items` showing progress (a bar, or log lines); a plain iterator when disabled."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import Progress

    items = list(items) if total is None else items
    bar = OptionalProgress()
    bar.p = Progress(console=Console(stderr=True))
    task = bar.p.add_task(label, total=total if total is not None else len(items))
    with bar:
        for x in items:
            yield x
            bar.p.update(task, advance=1)

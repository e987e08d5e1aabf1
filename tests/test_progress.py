"""Progress in a log file: plain timestamped lines (rich draws nothing there until the end), at least
every 3·LOG_EVERY seconds even while a step does not advance."""

from __future__ import annotations

import re
import time

from lowbit import progress


def test_log_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.05)
    for _ in progress.progress_iter(range(3), "evaluation"):
        time.sleep(0.12)
    time.sleep(0.01)
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if "evaluation" in line]
    assert lines and all(re.match(r"^\[\d\d:\d\d:\d\d\] evaluation \d/3", line) for line in lines), err
    assert lines[-1].startswith("[") and "evaluation 3/3" in lines[-1]  # the final state, once at the end


def test_a_stalled_step_still_prints(monkeypatch, capsys):
    from rich.console import Console
    from rich.progress import Progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.05)
    bar = progress.OptionalProgress()
    bar.p = Progress(console=Console(stderr=True))
    bar.p.add_task("one long layer", total=1)
    with bar:
        time.sleep(0.5)  # nothing advances: lines every 3·0.05 s all the same
    lines = [line for line in capsys.readouterr().err.splitlines() if "one long layer 0/1" in line]
    assert len(lines) >= 3, lines


def test_step_progress_shows_its_fields_in_a_log(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY", 0.05)
    with progress.StepProgress("finetune (l4q)", 2, True, loss=float("nan")) as bar:
        for loss in (2.5, 1.25):
            time.sleep(0.12)
            bar.update(loss=loss)
    lines = [line for line in capsys.readouterr().err.splitlines() if "finetune (l4q)" in line]
    assert lines and "finetune (l4q) 2/2 (loss 1.25)" in lines[-1], lines


def test_step_progress_disabled_prints_nothing(capsys):
    with progress.StepProgress("quiet", 3, False, loss=0.0) as bar:
        bar.update(loss=1.0)
    assert capsys.readouterr().err == ""

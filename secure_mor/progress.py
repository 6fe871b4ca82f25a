"""The progress bar of every long command (rich), and the callback that draws a training's steps on it."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)  # fmt: skip


def training_task(bar: Progress, label: str, first: str = "") -> Callable[[int, int, float], None]:
    """A task on `bar` (described `label: first` until the first step) and its `progress(step, total, loss)`."""
    task = bar.add_task(f"{label}: {first}" if first else label, total=None)

    def progress(step: int, total: int, loss: float) -> None:
        bar.update(task, completed=step, total=total, description=f"{label} loss {loss:.3f}")

    return progress

"""A rich progress bar for a batch: status, counts, rate and time left."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class BatchProgress:
    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.fields[status]:<11}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"),
            TextColumn("{task.fields[rate]} lines/s"), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False, disable=not enabled)
        self._task: TaskID | None = None

    def __enter__(self) -> BatchProgress:
        self._progress.__enter__()
        self._task = self._progress.add_task("batch", total=None, status="validating",
                                             failed=0, rate="-")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def update(self, status: str, total: int, completed: int, failed: int) -> None:
        assert self._task is not None
        task = self._progress.tasks[self._task]
        done = completed + failed
        elapsed = task.elapsed or 0.0
        rate = f"{done / elapsed:,.0f}" if elapsed > 0 and done else "-"
        self._progress.update(self._task, total=total or None, completed=done, status=status,
                              failed=failed, rate=rate)

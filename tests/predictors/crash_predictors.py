"""Predictors the crash tests deploy (`tests/acceptance/test_crash_phases.py`). Like the
other predictor modules, they live outside the `tests` package: workers import them
through `python_path`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


class SlowToComplete:
    """Answers each item with itself. Its `on_job_complete` writes a line to the file
    `config["marks"]` as it starts ("start <pid>") and as it ends ("end <pid>"); the first
    call sleeps `config["complete_sleep"]` seconds in between, so that a test can kill the
    worker running it, and later calls do not (the job then ends promptly)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.marks = Path(config["marks"]) if "marks" in config else None
        self.sleep = float(config.get("complete_sleep", 0))

    def predict(self, batch: list[Any]) -> list[Any]:
        return [{"seen": item} for item in batch]

    def on_job_complete(self) -> None:
        if self.marks is None:
            return
        first = not self.marks.exists()
        _mark(self.marks, "start")
        if first:
            time.sleep(self.sleep)
        _mark(self.marks, "end")


def _mark(path: Path, what: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(f"{what} {os.getpid()}\n")

"""Predictors the job tests deploy: each shows one behaviour of the interface. They live
outside the `tests` package on purpose: workers import them through `python_path`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("job_predictors")


class Doubler:
    """Doubles numbers; logs a line per batch; records on_job_complete calls in a file."""

    def __init__(self, config: dict[str, Any], job: dict[str, Any]) -> None:
        self.config = config
        self.job = job
        self.marks = Path(config["marks"]) if "marks" in config else None

    def predict(self, batch: list[Any], batch_id: str) -> list[Any]:
        log.info("batch %s: %d items", batch_id, len(batch))
        time.sleep(float(self.config.get("sleep", 0)))
        for item in batch:
            if isinstance(item, dict) and item.get("fail"):
                raise ValueError(f"refusing item {item}")
        return [{"double": item * 2} if isinstance(item, int | float) else {"seen": item}
                for item in batch]

    def on_job_complete(self) -> None:
        log.info("on_job_complete of %s", self.job["id"])
        if self.marks is not None:
            self.marks.mkdir(parents=True, exist_ok=True)
            with (self.marks / "on_job_complete").open("a") as out:
                out.write(f"{os.getpid()} {self.job['id']}\n")


class ConfigEcho:
    """Answers every item with the merged config it was built with."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def predict(self, batch: list[Any]) -> list[Any]:
        return [self.config for _ in batch]


class AsyncEcho:
    def __init__(self, job_spec: dict[str, Any]) -> None:
        self.job_id = job_spec["id"]

    async def predict(self, batch_id: str, payload: list[Any]) -> list[Any]:
        await asyncio.sleep(0.01)
        return [{"job": self.job_id, "batch_id": batch_id, "item": item} for item in payload]


class KillsItself:
    """The first time it meets an item "die", it SIGKILLs its own process (as a predictor
    that crashes or runs out of memory would); the batch must be retried elsewhere."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.flag = Path(config["flag"])

    def predict(self, batch: list[Any]) -> list[Any]:
        if "die" in batch and not self.flag.exists():
            self.flag.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return [f"ok:{item}" for item in batch]


class Writer:
    """summary_only: writes its own output file per batch under the job's output_path."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.out = Path(job["output_path"])

    def predict(self, batch: list[Any], batch_id: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{batch_id.replace(':', '_')}.txt").write_text(
            "\n".join(str(x) for x in batch))

"""Predictors the lease-engine proof tests deploy (`tests/acceptance/test_one_engine_*`),
for OpenAI batch lines (a `python` deployment as a line's model) and for job items alike.
Like `job_predictors`, they live outside the `tests` package: workers import them through
`python_path`."""

from __future__ import annotations

import os
import time
from typing import Any

#: The exit status of a process a poison request or item took down.
POISON_EXIT = 86


def _text(item: Any) -> Any:
    """What a test put in an item: a job item as it is, or a chat line's last message."""
    if isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"]:
        last = item["messages"][-1]
        return last.get("content") if isinstance(last, dict) else last
    return item


class PidEcho:
    """Answers each request or item with its text and the pid of the process that ran it,
    so a test can tell from the output which worker ran what.

    config: `sleep`, seconds per item (to keep a worker busy); `poison`, a text on which
    the process ends itself at once, as a segfaulting or out-of-memory model would. It
    does so every time it meets that text, so only isolating it lets the rest finish."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.sleep = float(config.get("sleep", 0))
        self.poison = config.get("poison")

    def predict(self, batch: list[Any]) -> list[Any]:
        texts = [_text(item) for item in batch]
        if self.poison is not None and self.poison in texts:
            os._exit(POISON_EXIT)  # no cleanup, no traceback: the process is just gone
        if self.sleep:
            time.sleep(self.sleep * len(batch))
        return [{"pid": os.getpid(), "text": text} for text in texts]

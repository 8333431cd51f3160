"""A predictor of the retry tests (`tests/acceptance/test_retry_results.py`): it fails the
batches holding an item marked `fail` while a marker file exists, and records every item
it is given, so a test sees what a retry sent to the model again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Flaky:
    def __init__(self, config: dict[str, Any]) -> None:
        self.broken = Path(config["broken"])
        self.seen = Path(config["seen"])
        self.sleep = float(config.get("sleep", 0))

    def predict(self, batch: list[Any]) -> list[Any]:
        time.sleep(self.sleep)
        with self.seen.open("a") as out:
            out.writelines(json.dumps(item) + "\n" for item in batch)
        if self.broken.exists() and any(item.get("fail") for item in batch):
            raise ValueError("a marked item, while the model is broken")
        return [{"ok": item["n"]} for item in batch]

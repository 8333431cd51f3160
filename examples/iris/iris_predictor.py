"""The iris predictor: a scikit-learn model behind Batchery's predictor interface."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent


class IrisPredictor:
    def __init__(self, config: dict[str, Any], job: dict[str, Any]) -> None:
        path = Path(config.get("model_path", "model.pkl"))
        bundle = pickle.loads((path if path.is_absolute() else HERE / path).read_bytes())
        self.model = bundle["model"]
        self.labels: list[str] = bundle["labels"]
        self.features: tuple[str, ...] = tuple(bundle["features"])
        self.threshold = float(config.get("threshold", 0.0))
        self.job = job

    def _row(self, item: Any, position: int) -> list[float]:
        """An item is a CSV row (a mapping of the four features) or a list of four numbers."""
        if isinstance(item, dict):
            missing = [f for f in self.features if f not in item]
            if missing:
                raise ValueError(f"item {position} lacks {', '.join(missing)}")
            return [float(item[f]) for f in self.features]
        if isinstance(item, list | tuple) and len(item) == len(self.features):
            return [float(x) for x in item]
        raise ValueError(f"item {position}: expected four numbers or a mapping of "
                         f"{', '.join(self.features)}, got {item!r}")

    def predict(self, batch: list[Any], batch_id: str) -> list[dict[str, Any]]:
        log.info("batch %s: %d items", batch_id, len(batch))
        rows = np.array([self._row(item, i) for i, item in enumerate(batch)])
        probabilities = self.model.predict_proba(rows)
        results = []
        for p in probabilities:
            best = int(np.argmax(p))
            confident = float(p[best]) >= self.threshold
            results.append({"label": self.labels[best] if confident else None,
                            "confidence": round(float(p[best]), 4)})
        return results

    def on_job_complete(self) -> None:
        log.info("iris job %s complete: %s batches", self.job["id"],
                 self.job.get("total_batch_count"))

"""`python`: a user's predictor class as a model for batch lines. A deployment of an
endpoint can serve both jobs and, when a line's `model` names the endpoint, OpenAI-style
batch lines: the line bodies are the items, and each prediction is the response body."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchery.backends.predictor import LoadedPredictor, load_predictor, parse_options
from batchery.model.batches import SUPPORTED_ENDPOINTS
from batchery.ports.backend import ModelBackend, Reply, Request, error_reply


class PythonPredictorBackend(ModelBackend):
    endpoints = frozenset(SUPPORTED_ENDPOINTS)
    runs_user_code = True
    serves_jobs = True

    @classmethod
    def check_options(cls, options: Mapping[str, Any], where: str,
                      base_dir: Path | None) -> dict[str, Any]:
        # Imports nothing: the predictor is loaded by workers only. `python_path` is kept
        # absolute, so that a worker started anywhere finds the same code.
        parsed = parse_options(options, where, base_dir)
        return {**options, "python_path": list(parsed.python_path)}

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(options, "options")
        self._predictor: LoadedPredictor | None = None

    async def start(self) -> None:
        # No job here: the predictor gets an empty job spec.
        self._predictor = await load_predictor(self.options, {"id": None, "config": {}})

    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        assert self._predictor is not None, "start() was not called"
        predictions = await self._predictor.predict([r.body for r in requests], "")
        if predictions is None or len(predictions) != len(requests):
            return [error_reply(500, "the predictor did not return one prediction per "
                                     "request", type_="server_error")] * len(requests)
        return [Reply(status_code=200, body=p if isinstance(p, dict) else {"prediction": p})
                for p in predictions]

    async def aclose(self) -> None:
        if self._predictor is not None:
            self._predictor.close()

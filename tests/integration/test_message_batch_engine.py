"""Anthropic message batches on the engine, without HTTP."""

from __future__ import annotations

from pathlib import Path

import orjson

from batchery.api.anthropic_wire import request_counts
from batchery.batchapi.message_batches import MessageBatchService
from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.model.deployments import Deployment
from batchery.stores.sql.store import SqlStore
from batchery.workers import worker as worker_for


def test_a_batch_cancelled_before_validation_reports_every_request(tmp_path: Path) -> None:
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'b.db'}")
    store.set_deployments([Deployment(name="echo", backend="echo")])
    files = FsspecFileStore(str(tmp_path / "files"))
    service = MessageBatchService(store, files)
    batch = service.create("p", [
        {"custom_id": f"c{i}", "params": {"model": "echo", "max_tokens": 5,
                                          "messages": [{"role": "user", "content": "x"}]}}
        for i in range(7)])
    service.cancel("p", batch.id)
    worker = worker_for(store, files)
    try:
        assert worker.run_once()
    finally:
        worker.stop()
        worker.run()
    ended = store.get_batch("p", batch.id)
    assert ended is not None and ended.status.value == "cancelled"
    assert request_counts(ended) == {"processing": 0, "succeeded": 0, "errored": 0,
                                     "canceled": 7, "expired": 0}
    size, stream = service.open_results("p", batch.id)
    assert stream is not None
    with stream:
        lines = [orjson.loads(x) for x in stream.read().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"c{i}" for i in range(7)]
    assert {x["result"]["type"] for x in lines} == {"canceled"}
    assert size > 0
    store.close()

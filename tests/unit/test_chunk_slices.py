"""How a chunk's lines are handed to a backend: in concurrent slices by default, or as
whole calls of up to the backend's `max_lines_per_call` (a model that sorts its inputs by
length across a chunk)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson

from batchery.batchapi import execution
from batchery.model.retry import RetryPolicy
from batchery.ports.backend import ModelBackend, Reply, Request

ENDPOINT = "/v1/embeddings"


class Counting(ModelBackend):
    endpoints = frozenset({ENDPOINT})

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        self.calls.append(len(requests))
        return [Reply(status_code=200, body={"object": "list", "data": []}) for _ in requests]


class Whole(Counting):
    max_lines_per_call = 4096


def calls(backend: Counting, n: int) -> list[int]:
    async def lookup(model: str) -> ModelBackend | None:
        return backend

    lines = [orjson.dumps({"custom_id": f"r{i}", "body": {"model": "m", "input": "hi"}})
             for i in range(n)]
    output = asyncio.run(execution.run_chunk(lines, ENDPOINT, lookup, RetryPolicy()))
    assert output.n_ok == n and len(set(output.offsets)) == n
    return backend.calls


def test_a_chunk_runs_in_concurrent_slices_by_default() -> None:
    found = calls(Counting(), 125)
    assert sum(found) == 125 and len(found) == execution.MIN_SLICES


def test_a_backend_that_sorts_a_whole_chunk_gets_it_in_one_call() -> None:
    assert calls(Whole(), 125) == [125]


def test_whole_calls_stop_at_the_backends_limit() -> None:
    class Small(Counting):
        max_lines_per_call = 100

    assert calls(Small(), 250) == [100, 100, 50]

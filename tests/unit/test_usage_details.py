"""A batch's usage details: the cached input tokens and the reasoning output tokens that
upstreams report, summed as lines finish, and shown on the batch object."""

from __future__ import annotations

import dataclasses

from batchery.api.wire import batch_object
from batchery.batchapi.execution import ChunkOutput
from batchery.model.batches import Batch, BatchStatus
from batchery.ports.backend import Reply


def _reply(usage: dict[str, object]) -> Reply:
    return Reply(status_code=200, body={"object": "chat.completion", "usage": usage})


def test_details_are_summed_in_both_spellings() -> None:
    output = ChunkOutput()
    output.add_all(["a", "b", "c"], [
        _reply({"prompt_tokens": 10, "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 2}}),
        # Responses spell them this way.
        _reply({"input_tokens": 7, "output_tokens": 3,
                "input_tokens_details": {"cached_tokens": 1},
                "output_tokens_details": {"reasoning_tokens": 3}}),
        # An upstream that reports none, or something that is not a count.
        _reply({"prompt_tokens": 1, "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": True}}),
    ], "m", [0, 1, 2])
    taken = output.take()
    assert (taken.input_tokens, taken.output_tokens) == (18, 9)
    assert (taken.cached_tokens, taken.reasoning_tokens) == (5, 5)
    assert (output.cached_tokens, output.reasoning_tokens) == (0, 0)  # taken away


def test_the_batch_object_shows_them() -> None:
    batch = Batch(id="batch_1", project="p", endpoint="/v1/chat/completions",
                  input_file_id="file-1", completion_window="24h",
                  status=BatchStatus.IN_PROGRESS, created_at=1, expires_at=2)
    batch = dataclasses.replace(batch, input_tokens=18, output_tokens=9, cached_tokens=5,
                                reasoning_tokens=2)
    usage = batch_object(batch)["usage"]
    assert usage["input_tokens_details"] == {"cached_tokens": 5}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 2}
    assert usage["total_tokens"] == 27

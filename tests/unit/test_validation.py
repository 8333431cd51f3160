from __future__ import annotations

import io
from typing import Any

import orjson
import pytest

from batchery.batchapi import validation
from tests.helpers import chat_file, chat_line, jsonl

ENDPOINT = "/v1/chat/completions"


def run(data: bytes, *, max_tasks: int = 1000, chunk_size: int = 10,
        known: tuple[str, ...] = ("echo",), reread: bool = True,
        endpoint: str = ENDPOINT) -> validation.Report:
    return validation.validate(
        validation.iter_lines(io.BytesIO(data)), endpoint=endpoint,
        model_known=set(known).__contains__, max_tasks=max_tasks, chunk_size=chunk_size,
        reread=(lambda: validation.iter_lines(io.BytesIO(data))) if reread else None)


def test_chunks_cover_every_request_by_byte_range() -> None:
    data = chat_file(25)
    report = run(data)
    assert report.ok and report.total == 25 and report.models == {"echo"}
    assert [c.n_lines for c in report.chunks] == [10, 10, 5]
    assert [c.first_line for c in report.chunks] == [1, 11, 21]
    assert report.chunks[0].start_offset == 0
    assert report.chunks[-1].end_offset == len(data)
    for before, after in zip(report.chunks, report.chunks[1:], strict=False):
        assert before.end_offset == after.start_offset
    sliced = data[report.chunks[1].start_offset:report.chunks[1].end_offset]
    assert sliced.splitlines()[0].startswith(b'{"custom_id":"req-10"')


def test_blank_lines_are_skipped_but_counted_for_line_numbers() -> None:
    data = jsonl([chat_line("a"), "", "   ", "not json"])
    report = run(data)
    assert [(e.line, e.code) for e in report.errors] == [(4, "invalid_json_line")]


def test_no_trailing_newline() -> None:
    data = chat_file(3).rstrip(b"\n")
    report = run(data)
    assert report.ok and report.chunks[-1].end_offset == len(data)


@pytest.mark.parametrize(("line", "code", "param"), [
    ([1, 2], "invalid_request", None),
    ({**chat_line("a"), "method": "GET"}, "invalid_request", "method"),
    ({**chat_line("a"), "custom_id": 7}, "invalid_request", "custom_id"),
    ({**chat_line("a"), "body": "text"}, "invalid_request", "body"),
    ({**chat_line("a"), "url": "/v1/completions"}, "invalid_url", "url"),
    (chat_line("a", stream=True), "streaming_unsupported", "body.stream"),
    (chat_line("a", model="gpt-9"), "model_not_found", "body.model"),
    (chat_line("a", model=None), "invalid_request", "body.model"),
    (chat_line("a", messages=None), "invalid_request", "body.messages"),
])
def test_line_errors(line: Any, code: str, param: str | None) -> None:
    report = run(jsonl([line]))
    assert [(e.line, e.code, e.param) for e in report.errors] == [(1, code, param)]


def test_error_report_is_capped_but_counts_everything() -> None:
    report = run(b"nope\n" * 250)
    assert report.error_count == 250 and len(report.errors) == 100


def test_duplicates_are_confirmed_exactly() -> None:
    data = jsonl([chat_line("a"), chat_line("b"), chat_line("a"), chat_line("a")])
    assert [e.line for e in run(data).errors] == [3, 4]
    assert [e.line for e in run(data, reread=False).errors] == [3, 4]


def test_hash_collisions_are_not_reported_as_duplicates(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(validation, "_custom_id_hash", lambda _: 42)  # everything collides
    data = jsonl([chat_line("a"), chat_line("b"), chat_line("c"), chat_line("b")])
    assert [(e.line, e.code) for e in run(data).errors] == [(4, "duplicate_custom_id")]


def test_too_many_tasks_stops_early() -> None:
    report = run(chat_file(50), max_tasks=20)
    assert [e.code for e in report.errors] == ["too_many_tasks"]
    assert "20" in report.errors[0].message


def test_empty_file() -> None:
    assert [e.code for e in run(b"").errors] == ["empty_file"]
    assert [e.code for e in run(b"\n\n").errors] == ["empty_file"]


def test_5000_lines_validate_into_chunks_of_the_chunk_size() -> None:
    # What validation holds per line is measured by tests/unit/test_dedupe.py.
    data = chat_file(5000)
    report = run(data, max_tasks=10_000, chunk_size=1000)
    assert report.ok and len(report.chunks) == 5


def line_for(url: str, custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def errors_of(report: validation.Report) -> list[tuple[int | None, str, str | None, str]]:
    return [(e.line, e.code, e.param, e.message) for e in report.errors]


def test_every_missing_field_of_every_line_is_reported() -> None:
    no_model = chat_line("a")
    del no_model["body"]["model"]
    no_messages = chat_line("b")
    del no_messages["body"]["messages"]
    data = jsonl([no_model, no_messages, chat_line("c"), line_for(ENDPOINT, "d"),
                  chat_line("e", model=None, messages=None)])
    model = ("invalid_request", "body.model", "Model parameter is required.")
    messages = ("invalid_request", "body.messages", "Messages parameter is required.")
    assert errors_of(run(data)) == [(1, *model), (2, *messages), (4, *model),
                                    (4, *messages), (5, *model), (5, *messages)]


@pytest.mark.parametrize(("endpoint", "field"), [
    ("/v1/completions", "prompt"), ("/v1/embeddings", "input"), ("/v1/responses", "input"),
    ("/v1/moderations", "input"),
])
def test_each_endpoint_requires_its_own_input(endpoint: str, field: str) -> None:
    data = jsonl([line_for(endpoint, "ok", model="echo", **{field: "hi"}),
                  line_for(endpoint, "bad", model="echo", messages=USER)])
    report = run(data, endpoint=endpoint)
    assert errors_of(report) == [(2, "invalid_request", f"body.{field}",
                                  f"{field.capitalize()} parameter is required.")]


def test_the_missing_cap_counts_every_line() -> None:
    no_messages = chat_line("x")
    del no_messages["body"]["messages"]
    report = run(jsonl([{**no_messages, "custom_id": f"r{i}"} for i in range(250)]))
    assert report.error_count == 250 and len(report.errors) == 100
    assert {e.param for e in report.errors} == {"body.messages"}
    assert [e.line for e in report.errors] == list(range(1, 101))


def test_messages_are_the_hosted_apis() -> None:
    data = jsonl([chat_line("a", model="nonexistent-model-xyz"),
                  {**chat_line("b"), "url": "/v1/embeddings"},
                  chat_line("c", stream=True)])
    assert [e.message for e in run(data).errors] == [
        "The provided model 'nonexistent-model-xyz' is not supported by the Batch API.",
        "The URL provided for this request does not match the batch endpoint.",
        "Chat Completions: Streaming is not supported in the Batch API.",
    ]


def test_wrong_shapes_pass_validation_to_be_400_lines() -> None:
    """A body of the wrong shape does not fail the batch: it runs, as a 400 line of the
    error file (`request_schemas`, checked before any backend)."""
    data = jsonl([chat_line("a", messages=[{"rolez": "user", "contentz": "hi"}]),
                  chat_line("b", temperature=9), chat_line("c", messages=[])])
    report = run(data)
    assert report.ok and report.total == 3 and report.models == {"echo"}


USER = [{"role": "user", "content": "hi"}]


_GOOD = {"custom_id": "a", "method": "POST", "url": ENDPOINT,
         "body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}}


def _variants() -> list[Any]:
    """The good line, and each of its parts changed to something the full check judges."""
    found: list[Any] = [_GOOD, [], "x", None, 3]
    for key in ("custom_id", "method", "url", "body"):
        for value in (None, "", 0, [], {}, "POST", "/chat/completions", "/v1/embeddings",
                      "/v1/chat/completions/", "a"):
            found.append({**_GOOD, key: value})
        found.append({k: v for k, v in _GOOD.items() if k != key})
    body = _GOOD["body"]
    for key in ("model", "messages", "stream"):
        for value in (None, True, False, "", "echo", "other", 1, []):
            found.append({**_GOOD, "body": {**body, key: value}})
        found.append({**_GOOD, "body": {k: v for k, v in body.items() if k != key}})
    return found


@pytest.mark.parametrize(("endpoint", "good"), [(ENDPOINT, True), ("/chat/completions", True),
                                                ("/v1/embeddings", False)])
def test_the_fast_path_never_passes_a_line_the_full_check_refuses(endpoint: str,
                                                                  good: bool) -> None:
    """Most lines are answered by one quick question; any doubt goes to `check_line`,
    which alone decides. A line the quick question lets through must be one the full
    check finds nothing wrong with, with the same custom_id."""
    known = {"echo"}
    passed = 0
    for obj in _variants():
        raw = orjson.dumps(obj) + b"\n"
        fast = validation._FastPath(endpoint, known.__contains__, set())
        custom_id, model, errors = validation.check_line(raw, 1, endpoint, known.__contains__)
        quick = fast.custom_id(raw)
        if quick is not None:
            passed += 1
            assert not errors and quick == custom_id and model is not None, obj
        else:  # a quick no is fine only where the full check says no, or is unsure
            assert errors or custom_id is None or obj is not _GOOD, obj
    assert (passed > 0) is good  # (an embeddings batch has no line with an `input`)

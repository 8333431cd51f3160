"""Which failed lines a retry reruns (extension): the default retriable errors, and the
codes `include` matches; and the results cursors a client passes back."""

from __future__ import annotations

from typing import Any

import pytest

from batchery.batchapi.retry import line_codes, parse_include, rerun
from batchery.model.cursors import ResultsCursor
from batchery.model.exceptions import InvalidRequest


def reply(status: int, code: str | None = None, type_: str = "server_error") -> dict[str, Any]:
    return {"custom_id": "a", "error": None, "response": {
        "status_code": status, "body": {"error": {"code": code, "type": type_}}}}


def unrun(code: str) -> dict[str, Any]:
    return {"custom_id": "a", "response": None, "error": {"code": code, "message": "…"}}


def result(kind: str, error_type: str | None = None, message: str = "…") -> dict[str, Any]:
    found: dict[str, Any] = {"type": kind}
    if error_type:
        found["error"] = {"type": "error", "error": {"type": error_type, "message": message}}
    return {"custom_id": "a", "result": found}


@pytest.mark.parametrize(("line", "expected"), [
    (reply(500), True), (reply(503), True), (reply(429, type_="rate_limit"), True),
    (reply(408, type_="timeout"), True), (reply(400, "invalid_value", "invalid"), False),
    (reply(404, "model_not_found", "invalid"), False),
    (unrun("batch_cancelled"), True), (unrun("batch_expired"), True),
    (unrun("server_error"), True), (unrun("worker_crashed"), True),
    (unrun("budget_exceeded"), False),
])
def test_openai_lines_rerun_by_default_only_when_retriable(line: dict[str, Any],
                                                           expected: bool) -> None:
    assert rerun(line, False, None) is expected


def test_include_matches_codes_statuses_and_status_classes() -> None:
    bad = reply(400, "invalid_value", "invalid_request_error")
    assert line_codes(bad, False) == {"400", "4xx", "invalid_value", "invalid_request_error"}
    assert rerun(bad, False, frozenset({"4xx"}))
    assert rerun(bad, False, frozenset({"invalid_value"}))
    assert not rerun(reply(500), False, frozenset({"4xx"}))  # include replaces the default
    assert rerun(unrun("budget_exceeded"), False, frozenset({"budget_exceeded"}))


@pytest.mark.parametrize(("line", "expected"), [
    (result("canceled"), True), (result("expired"), True),
    (result("errored", "api_error"), True), (result("errored", "overloaded_error"), True),
    (result("errored", "invalid_request_error"), False),
    (result("errored", "api_error", "budget_exceeded: the batch's max_cost …"), False),
])
def test_message_results_rerun_by_default_only_when_retriable(line: dict[str, Any],
                                                              expected: bool) -> None:
    assert rerun(line, True, None) is expected


def test_message_include_matches_result_and_error_types() -> None:
    line = result("errored", "invalid_request_error")
    assert line_codes(line, True) == {"errored", "invalid_request_error"}
    assert rerun(line, True, frozenset({"errored"}))


@pytest.mark.parametrize("value", ["server_error", [], [""], [1], ["x"] * 101])
def test_a_bad_include_is_a_400_naming_it(value: Any) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_include(value)
    assert refused.value.param == "include"


def test_cursors_round_trip_and_refuse_what_they_did_not_make() -> None:
    stages = ("co", "p", "fo")
    cursor = ResultsCursor("p", 41, 3, 100, 7)
    assert ResultsCursor.decode(cursor.encode(), stages) == cursor
    assert ResultsCursor.decode(None, stages) == ResultsCursor("co")
    for text in ("nope", ResultsCursor("zz").encode(), ResultsCursor("p", -5).encode(),
                 "WyJwIiwxXQ"):
        with pytest.raises(InvalidRequest) as refused:
            ResultsCursor.decode(text, stages)
        assert refused.value.param == "after"

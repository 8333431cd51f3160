"""Reading job submissions: every mistake gets a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from batchery.jobs import submission
from batchery.model.exceptions import InvalidRequest
from batchery.model.jobs import InputKind, OutputMode

ITEMS = {"item_list": {"items": [1, 2], "batch_size": 1}}


def test_a_full_submission() -> None:
    parsed = submission.parse({
        "delimited_files": {"paths": ["s3://b/p/"], "includes": ["**.csv"],
                            "excludes": ["tmp/**"], "batch_size": 100},
        "deployment": "v2", "workers": 4, "config": {"k": 1}, "timeout": 60,
        "batch_timeout": 5.5, "max_retries": 0, "error_threshold": 2,
        "output": "summary_only", "output_path": "s3://b/out", "dry_run": True})
    assert parsed.input.kind is InputKind.DELIMITED_FILES
    assert parsed.input.paths == ("s3://b/p/",) and parsed.input.includes == ("**.csv",)
    options = parsed.options
    assert (options.workers, options.timeout_s, options.batch_timeout_s) == (4, 60.0, 5.5)
    assert (options.max_retries, options.error_threshold) == (0, 2)
    assert options.output is OutputMode.SUMMARY_ONLY and options.config == {"k": 1}
    assert parsed.deployment == "v2" and parsed.output_path == "s3://b/out" and parsed.dry_run


def test_defaults() -> None:
    parsed = submission.parse(ITEMS)
    assert parsed.options.max_retries == 3 and parsed.options.error_threshold == -1
    assert parsed.options.workers is None and parsed.options.output is OutputMode.APPEND_ROW
    assert not parsed.dry_run and parsed.deployment is None


@pytest.mark.parametrize(("body", "param"), [
    ([], "body"),
    ({}, "item_list"),
    ({**ITEMS, "file_path_lister": {"paths": ["a"], "batch_size": 1}}, "file_path_lister"),
    ({"item_list": {"items": "abc", "batch_size": 1}}, "item_list.items"),
    ({"item_list": {"items": [1], "batch_size": 0}}, "item_list.batch_size"),
    ({"item_list": {"items": [1], "batch_size": True}}, "item_list.batch_size"),
    ({"item_list": {"items": [1], "batch_size": 1, "extra": 1}}, "item_list.extra"),
    ({"file_path_lister": {"paths": [], "batch_size": 1}}, "file_path_lister.paths"),
    ({"file_path_lister": {"paths": ["a"], "includes": "x", "batch_size": 1}},
     "file_path_lister.includes"),
    ({**ITEMS, "timeout": -1}, "timeout"),
    ({**ITEMS, "batch_timeout": "5"}, "batch_timeout"),
    ({**ITEMS, "max_retries": -1}, "max_retries"),
    ({**ITEMS, "error_threshold": -2}, "error_threshold"),
    ({**ITEMS, "output": "csv"}, "output"),
    ({**ITEMS, "config": [1]}, "config"),
    ({**ITEMS, "dry_run": "yes"}, "dry_run"),
    ({**ITEMS, "deployment": ""}, "deployment"),
])
def test_mistakes_name_the_field(body: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        submission.parse(body)
    assert caught.value.param == param

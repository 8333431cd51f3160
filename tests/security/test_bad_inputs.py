"""A corpus of bad inputs across the three APIs (OpenAI files and batches, Anthropic
message batches, the job API), each answered with the right 4xx, error code and param,
never a 5xx (the clients of `conftest.py` also check that no answer leaks a secret).

Requests refused at once are a table of `Bad` rows. OpenAI batch input lines are checked
asynchronously, as on the hosted API: a batch is created, then fails validation with one
error per bad line; those are `LINES`. Anthropic `params` are also checked per request:
`PARAMS` rows end as `errored` results."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from tests.security.conftest import (
    Site,
    chat_line,
    create_batch,
    jsonl,
    openai_error,
    upload,
    wait_batch,
    wait_message_batch,
)

pytestmark = pytest.mark.slow


class _Unchecked:
    def __repr__(self) -> str:
        return "ANY"


#: An expectation that is not checked.
ANY: Any = _Unchecked()
JOBS = "/api/v1/endpoints/shared/jobs"
DRY_JOBS = JOBS + "?dry_run=true"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Bad:
    """One bad request and the answer it must get."""

    method: str
    path: str
    status: int
    #: The OpenAI envelope's `error.code`, or the Anthropic envelope's `error.type`.
    code: Any = ANY
    #: The OpenAI envelope's `error.param` (Anthropic's envelope has none).
    param: Any = ANY
    #: A JSON body (placeholders such as `{batch_file}` are filled in), or a raw one.
    json: Any = ANY
    raw: bytes | None = None
    #: A multipart body: form fields and an optional file part.
    form: dict[str, str] | None = None
    file: tuple[str, bytes] | None = None
    #: Words the error message must contain.
    words: str = ""
    who: str = "alpha"
    headers: dict[str, str] = field(default_factory=dict)


def bad(name: str, method: str, path: str, status: int, **kw: Any) -> Any:
    return pytest.param(Bad(method, path, status, **kw), id=name)


def _batch(**body: Any) -> dict[str, Any]:
    """A create-batch body: valid but for what `body` changes (None removes a key)."""
    base: dict[str, Any] = {"input_file_id": "{batch_file}", "endpoint": CHAT,
                            "completion_window": "24h"}
    return {k: v for k, v in {**base, **body}.items() if v is not None}


def _message(custom_id: Any = "r1", **params: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "echo", "max_tokens": 8,
                            "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": custom_id,
            "params": {k: v for k, v in {**base, **params}.items() if v is not None}}


def _job(**body: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"item_list": {"items": [1, 2], "batch_size": 1}}
    return {k: v for k, v in {**base, **body}.items() if v is not None}


def _items(**spec: Any) -> dict[str, Any]:
    return {"item_list": {k: v for k, v in {"items": [1], "batch_size": 1, **spec}.items()
                          if v is not None}}


def _lister(kind: str = "file_path_lister", **spec: Any) -> dict[str, Any]:
    return {kind: {k: v for k, v in {"paths": ["{alpha_root}"], "batch_size": 1,
                                     **spec}.items() if v is not None}}


def _endpoint(**body: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "bad-ep", "deployments": [{"name": "e", "backend": "echo"}]}
    return {k: v for k, v in {**base, **body}.items() if v is not None}


def _echo(**deployment: Any) -> dict[str, Any]:
    return _endpoint(deployments=[{"name": "e", "backend": "echo", **deployment}])


NESTED = b"[" * 5000 + b"]" * 5000
FILES = [
    # -- POST /v1/files ------------------------------------------------------------------
    bad("file-missing", "POST", "/v1/files", 400, form={"purpose": "batch"},
        code="missing_required_parameter", param="file"),
    bad("file-as-text-field", "POST", "/v1/files", 400,
        form={"purpose": "batch", "file": "not a file"},
        code="missing_required_parameter", param="file"),
    bad("purpose-missing", "POST", "/v1/files", 400, file=("in.jsonl", b"{}\n"),
        code="missing_required_parameter", param="purpose"),
    bad("purpose-empty", "POST", "/v1/files", 400, form={"purpose": ""},
        file=("in.jsonl", b"{}\n"), param="purpose"),
    bad("purpose-unknown", "POST", "/v1/files", 400, form={"purpose": "batches"},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="purpose"),
    bad("purpose-output-only", "POST", "/v1/files", 400, form={"purpose": "batch_output"},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="purpose"),
    bad("purpose-internal", "POST", "/v1/files", 400, form={"purpose": "message_batch"},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="purpose"),
    bad("expires-anchor", "POST", "/v1/files", 400,
        form={"purpose": "batch", "expires_after[anchor]": "last_active_at",
              "expires_after[seconds]": "3600"},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="expires_after.anchor"),
    bad("expires-seconds-twice", "POST", "/v1/files", 400,
        form={"purpose": "batch", "expires_after[anchor]": "created_at",
              "expires_after[seconds]": ["3600", "7200"]},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="expires_after.seconds"),
    bad("purpose-twice", "POST", "/v1/files", 400, form={"purpose": ["batch", "batch"]},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="purpose"),
    bad("expires-seconds-text", "POST", "/v1/files", 400,
        form={"purpose": "batch", "expires_after[anchor]": "created_at",
              "expires_after[seconds]": "an hour"},
        file=("in.jsonl", b"{}\n"), code="invalid_type", param="expires_after.seconds"),
    bad("expires-seconds-short", "POST", "/v1/files", 400,
        form={"purpose": "batch", "expires_after[anchor]": "created_at",
              "expires_after[seconds]": "60"},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="expires_after.seconds"),
    bad("expires-seconds-long", "POST", "/v1/files", 400,
        form={"purpose": "batch", "expires_after[anchor]": "created_at",
              "expires_after[seconds]": "2592001"},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="expires_after.seconds"),
    bad("expires-seconds-negative", "POST", "/v1/files", 400,
        form={"purpose": "batch", "expires_after[anchor]": "created_at",
              "expires_after[seconds]": "-3600"},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="expires_after.seconds"),
    bad("expires-seconds-huge", "POST", "/v1/files", 400,
        form={"purpose": "batch", "expires_after[anchor]": "created_at",
              "expires_after[seconds]": "9" * 40},
        file=("in.jsonl", b"{}\n"), code="invalid_value", param="expires_after.seconds"),
    bad("files-json-body", "POST", "/v1/files", 400, json={"purpose": "batch", "file": "x"}),
    bad("files-garbage-multipart", "POST", "/v1/files", 400, raw=b"--x\r\nnonsense",
        headers={"content-type": "multipart/form-data; boundary=x"}),
    # -- reading files -------------------------------------------------------------------
    bad("files-limit-zero", "GET", "/v1/files?limit=0", 400, code="invalid_value",
        param="limit"),
    bad("files-limit-over", "GET", "/v1/files?limit=10001", 400, code="invalid_value",
        param="limit"),
    bad("files-limit-negative", "GET", "/v1/files?limit=-1", 400, param="limit"),
    bad("files-limit-text", "GET", "/v1/files?limit=ten", 400, param="limit"),
    bad("files-limit-huge", "GET", "/v1/files?limit=" + "9" * 30, 400, param="limit"),
    bad("files-order", "GET", "/v1/files?order=sideways", 400, code="invalid_value",
        param="order"),
    bad("file-unknown", "GET", "/v1/files/file-doesnotexist", 404, param="id",
        words="No such File object"),
    bad("file-content-unknown", "GET", "/v1/files/file-doesnotexist/content", 404,
        param="id"),
    bad("file-delete-unknown", "DELETE", "/v1/files/file-doesnotexist", 404, param="id"),
    bad("file-id-nul", "GET", "/v1/files/file-%00", 404),
    bad("file-id-long", "GET", "/v1/files/" + "f" * 5000, 404),
    bad("file-id-batch", "GET", "/v1/files/{openai_batch}", 404),
    bad("files-put", "PUT", "/v1/files", 405),
]
BATCHES = [
    # -- POST /v1/batches: the body itself ------------------------------------------------
    bad("batch-json-truncated", "POST", "/v1/batches", 400, raw=b'{"input_file_id": '),
    bad("batch-json-trailing", "POST", "/v1/batches", 400, raw=b'{"endpoint": "x"} x'),
    bad("batch-json-array", "POST", "/v1/batches", 400, json=[]),
    bad("batch-json-string", "POST", "/v1/batches", 400, json="batch"),
    bad("batch-json-null", "POST", "/v1/batches", 400, raw=b"null"),
    bad("batch-json-latin1", "POST", "/v1/batches", 400, raw=b'{"endpoint": "\xe9"}'),
    bad("batch-json-nested", "POST", "/v1/batches", 400, raw=NESTED),
    bad("batch-json-bigint", "POST", "/v1/batches", 400,
        raw=b'{"input_file_id": ' + b"9" * 400 + b"}"),
    bad("batch-json-nan", "POST", "/v1/batches", 400, raw=b'{"input_file_id": NaN}'),
    bad("batch-empty-body", "POST", "/v1/batches", 400, raw=b"",
        code="missing_required_parameter"),
    # -- fields ---------------------------------------------------------------------------
    bad("input-file-missing", "POST", "/v1/batches", 400, json=_batch(input_file_id=None),
        code="missing_required_parameter", param="input_file_id"),
    bad("input-file-number", "POST", "/v1/batches", 400, json=_batch(input_file_id=123),
        code="invalid_type", param="input_file_id"),
    bad("input-file-list", "POST", "/v1/batches", 400, json=_batch(input_file_id=["x"]),
        code="invalid_type", param="input_file_id"),
    bad("input-file-object", "POST", "/v1/batches", 400, json=_batch(input_file_id={}),
        code="invalid_type", param="input_file_id"),
    bad("input-file-user-data", "POST", "/v1/batches", 400,
        json=_batch(input_file_id="{user_file}"), param="input_file_id"),
    bad("endpoint-missing", "POST", "/v1/batches", 400, json=_batch(endpoint=None),
        code="missing_required_parameter", param="endpoint"),
    bad("endpoint-number", "POST", "/v1/batches", 400, json=_batch(endpoint=5),
        code="invalid_type", param="endpoint"),
    bad("endpoint-unknown", "POST", "/v1/batches", 400,
        json=_batch(endpoint="/v1/invalid/endpoint"), code="invalid_value", param="endpoint",
        words="Invalid value: '/v1/invalid/endpoint'. Supported values are:"),
    bad("endpoint-no-slash", "POST", "/v1/batches", 400,
        json=_batch(endpoint="v1/chat/completions"), code="invalid_value", param="endpoint"),
    bad("endpoint-internal-messages", "POST", "/v1/batches", 400,
        json=_batch(endpoint="/v1/messages"), code="invalid_value", param="endpoint"),
    bad("endpoint-case", "POST", "/v1/batches", 400,
        json=_batch(endpoint="/V1/CHAT/COMPLETIONS"), code="invalid_value", param="endpoint"),
    bad("endpoint-empty", "POST", "/v1/batches", 400, json=_batch(endpoint=""),
        code="invalid_value", param="endpoint"),
    bad("window-number", "POST", "/v1/batches", 400, json=_batch(completion_window=24),
        code="invalid_type", param="completion_window"),
    bad("window-null", "POST", "/v1/batches", 400, json=_batch() | {"completion_window": None},
        param="completion_window"),
    bad("window-empty", "POST", "/v1/batches", 400, json=_batch(completion_window=""),
        code="invalid_value", param="completion_window"),
    bad("window-word", "POST", "/v1/batches", 400, json=_batch(completion_window="invalid"),
        code="invalid_value", param="completion_window"),
    bad("window-no-unit", "POST", "/v1/batches", 400, json=_batch(completion_window="24"),
        code="invalid_value", param="completion_window"),
    bad("window-zero", "POST", "/v1/batches", 400, json=_batch(completion_window="0h"),
        code="invalid_value", param="completion_window"),
    bad("window-negative", "POST", "/v1/batches", 400, json=_batch(completion_window="-1h"),
        code="invalid_value", param="completion_window"),
    bad("window-too-long", "POST", "/v1/batches", 400, json=_batch(completion_window="31d"),
        code="invalid_value", param="completion_window"),
    bad("window-huge", "POST", "/v1/batches", 400,
        json=_batch(completion_window="9999999999h"), code="invalid_value",
        param="completion_window"),
    bad("window-weeks", "POST", "/v1/batches", 400, json=_batch(completion_window="1w"),
        code="invalid_value", param="completion_window"),
    bad("metadata-string", "POST", "/v1/batches", 400, json=_batch(metadata="k=v"),
        code="invalid_type", param="metadata"),
    bad("metadata-list", "POST", "/v1/batches", 400, json=_batch(metadata=["k"]),
        code="invalid_type", param="metadata"),
    bad("metadata-value-array", "POST", "/v1/batches", 400,
        json=_batch(metadata={"tags": ["a"]}), code="invalid_type", param="metadata.tags",
        words="Invalid type for 'metadata.tags': expected a string, but got an array"),
    bad("metadata-value-number", "POST", "/v1/batches", 400, json=_batch(metadata={"n": 1}),
        code="invalid_type", param="metadata.n"),
    bad("metadata-value-null", "POST", "/v1/batches", 400, json=_batch(metadata={"n": None}),
        code="invalid_type", param="metadata.n"),
    bad("metadata-too-many", "POST", "/v1/batches", 400,
        json=_batch(metadata={f"k{i}": "v" for i in range(17)}), code="invalid_value",
        param="metadata"),
    bad("metadata-key-long", "POST", "/v1/batches", 400,
        json=_batch(metadata={"k" * 65: "v"}), code="invalid_value"),
    bad("metadata-value-long", "POST", "/v1/batches", 400,
        json=_batch(metadata={"k": "v" * 513}), code="invalid_value", param="metadata.k"),
    bad("output-expiry-anchor", "POST", "/v1/batches", 400,
        json=_batch(output_expires_after={"anchor": "completed_at", "seconds": 3600}),
        param="output_expires_after.anchor"),
    bad("output-expiry-short", "POST", "/v1/batches", 400,
        json=_batch(output_expires_after={"anchor": "created_at", "seconds": 60}),
        param="output_expires_after.seconds"),
    bad("output-expiry-type", "POST", "/v1/batches", 400,
        json=_batch(output_expires_after="1h"), param="output_expires_after"),
    # -- reading batches ------------------------------------------------------------------
    bad("batches-limit-zero", "GET", "/v1/batches?limit=0", 400, code="invalid_value",
        param="limit"),
    bad("batches-limit-over", "GET", "/v1/batches?limit=101", 400, code="invalid_value",
        param="limit"),
    bad("batches-limit-negative", "GET", "/v1/batches?limit=-20", 400, param="limit"),
    bad("batches-limit-text", "GET", "/v1/batches?limit=all", 400, param="limit"),
    bad("batches-limit-huge", "GET", "/v1/batches?limit=" + "9" * 30, 400, param="limit"),
    bad("batch-unknown", "GET", "/v1/batches/batch_doesnotexist", 404),
    bad("batch-cancel-unknown", "POST", "/v1/batches/batch_doesnotexist/cancel", 404),
    bad("batch-is-a-message-batch", "GET", "/v1/batches/{message_batch}", 404),
    bad("batch-cancel-message-batch", "POST", "/v1/batches/{message_batch}/cancel", 404),
    bad("batch-delete", "DELETE", "/v1/batches/{openai_batch}", 405),
    bad("batch-cancel-get", "GET", "/v1/batches/{openai_batch}/cancel", 405),
    bad("batch-cancel-completed", "POST", "/v1/batches/{openai_batch}/cancel", 409),
]
MESSAGES = [
    bad("msg-json-truncated", "POST", "/v1/messages/batches", 400,
        raw=b'{"requests": [', code="invalid_request_error"),
    bad("msg-json-empty", "POST", "/v1/messages/batches", 400, raw=b"",
        code="invalid_request_error"),
    bad("msg-json-array", "POST", "/v1/messages/batches", 400, json=[],
        code="invalid_request_error"),
    bad("msg-json-nested", "POST", "/v1/messages/batches", 400, raw=NESTED,
        code="invalid_request_error"),
    bad("msg-requests-missing", "POST", "/v1/messages/batches", 400, json={},
        code="invalid_request_error", words="requests"),
    bad("msg-requests-object", "POST", "/v1/messages/batches", 400,
        json={"requests": {"custom_id": "a"}}, code="invalid_request_error"),
    bad("msg-requests-empty", "POST", "/v1/messages/batches", 400, json={"requests": []},
        code="invalid_request_error"),
    bad("msg-requests-string", "POST", "/v1/messages/batches", 400, json={"requests": "a"},
        code="invalid_request_error"),
    bad("msg-request-number", "POST", "/v1/messages/batches", 400, json={"requests": [1]},
        code="invalid_request_error", words="requests.0"),
    bad("msg-custom-id-missing", "POST", "/v1/messages/batches", 400,
        json={"requests": [{"params": _message()["params"]}]},
        code="invalid_request_error", words="custom_id"),
    bad("msg-custom-id-long", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message("x" * 65)]}, code="invalid_request_error",
        words="custom_id"),
    bad("msg-custom-id-empty", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message("")]}, code="invalid_request_error", words="custom_id"),
    bad("msg-custom-id-space", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message("a b")]}, code="invalid_request_error",
        words="custom_id"),
    bad("msg-custom-id-newline", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message("abc\n")]}, code="invalid_request_error",
        words="custom_id"),
    bad("msg-custom-id-accent", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message("caf\u00e9")]}, code="invalid_request_error",
        words="custom_id"),
    bad("msg-custom-id-slash", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message("../x")]}, code="invalid_request_error",
        words="custom_id"),
    bad("msg-custom-id-number", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message(5)]}, code="invalid_request_error", words="custom_id"),
    bad("msg-custom-id-duplicate", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message("a"), _message("b"), _message("a")]},
        code="invalid_request_error", words="requests.2.custom_id"),
    bad("msg-params-missing", "POST", "/v1/messages/batches", 400,
        json={"requests": [{"custom_id": "a"}]}, code="invalid_request_error",
        words="params"),
    bad("msg-params-string", "POST", "/v1/messages/batches", 400,
        json={"requests": [{"custom_id": "a", "params": "hi"}]},
        code="invalid_request_error", words="params"),
    bad("msg-model-missing", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message(model=None)]}, code="invalid_request_error",
        words="model"),
    bad("msg-model-number", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message(model=5)]}, code="invalid_request_error",
        words="model"),
    bad("msg-stream", "POST", "/v1/messages/batches", 400,
        json={"requests": [_message(stream=True)]}, code="invalid_request_error",
        words="stream"),
    bad("msg-list-limit-zero", "GET", "/v1/messages/batches?limit=0", 400,
        code="invalid_request_error", words="limit"),
    bad("msg-list-limit-over", "GET", "/v1/messages/batches?limit=1001", 400,
        code="invalid_request_error", words="limit"),
    bad("msg-list-limit-text", "GET", "/v1/messages/batches?limit=many", 400,
        code="invalid_request_error", words="limit"),
    bad("msg-list-limit-huge", "GET", "/v1/messages/batches?limit=" + "9" * 30, 400,
        code="invalid_request_error", words="limit"),
    bad("msg-unknown", "GET", "/v1/messages/batches/msgbatch_doesnotexist", 404,
        code="not_found_error"),
    bad("msg-cancel-unknown", "POST", "/v1/messages/batches/msgbatch_doesnotexist/cancel",
        404, code="not_found_error"),
    bad("msg-delete-unknown", "DELETE", "/v1/messages/batches/msgbatch_doesnotexist", 404,
        code="not_found_error"),
    bad("msg-results-unknown", "GET", "/v1/messages/batches/msgbatch_doesnotexist/results",
        404, code="not_found_error"),
    bad("msg-is-an-openai-batch", "GET", "/v1/messages/batches/{openai_batch}", 404,
        code="not_found_error"),
    bad("msg-cancel-ended", "POST", "/v1/messages/batches/{message_batch}/cancel", 409,
        code="conflict_error"),
    bad("msg-put", "PUT", "/v1/messages/batches/{message_batch}", 405),
]
JOB_SUBMISSIONS = [
    bad("job-json-truncated", "POST", JOBS, 400, raw=b'{"item_list": {'),
    bad("job-json-array", "POST", JOBS, 400, json=[1, 2]),
    bad("job-json-nested", "POST", JOBS, 400, raw=NESTED),
    bad("job-empty", "POST", JOBS, 400, json={}, param="item_list", words="exactly one input"),
    bad("job-two-inputs", "POST", JOBS, 400,
        json=_items() | _lister("delimited_files"), param="delimited_files"),
    bad("job-unknown-field", "POST", JOBS, 400, json=_job(colour="red"), param="colour",
        words="Unknown field"),
    bad("job-endpoint-unknown", "POST", "/api/v1/endpoints/nope/jobs", 404, json=_job(),
        param="endpoint", words="No endpoint named 'nope'."),
    bad("item-list-list", "POST", JOBS, 400, json={"item_list": [1, 2]}, param="item_list"),
    bad("item-list-unknown-field", "POST", JOBS, 400, json=_items(shuffle=True),
        param="item_list.shuffle"),
    bad("items-missing", "POST", JOBS, 400, json=_items(items=None),
        param="item_list.items"),
    bad("items-string", "POST", JOBS, 400, json=_items(items="abc"),
        param="item_list.items"),
    bad("items-empty", "POST", JOBS, 400, json=_items(items=[]), param="item_list.items"),
    bad("batch-size-missing", "POST", JOBS, 400, json=_items(batch_size=None),
        param="item_list.batch_size"),
    bad("batch-size-zero", "POST", JOBS, 400, json=_items(batch_size=0),
        param="item_list.batch_size"),
    bad("batch-size-negative", "POST", JOBS, 400, json=_items(batch_size=-1),
        param="item_list.batch_size"),
    bad("batch-size-string", "POST", JOBS, 400, json=_items(batch_size="2"),
        param="item_list.batch_size"),
    bad("batch-size-float", "POST", JOBS, 400, json=_items(batch_size=1.5),
        param="item_list.batch_size"),
    bad("batch-size-bool", "POST", JOBS, 400, json=_items(batch_size=True),
        param="item_list.batch_size"),
    # Numbers past 64 bits. As the admin (project ops): a job accepted by mistake must not
    # spoil the listings the other rows read.
    bad("batch-size-huge", "POST", JOBS, 400, who="admin",
        raw=b'{"item_list": {"items": [1], "batch_size": ' + b"9" * 400 + b"}}"),
    bad("batch-size-huge-float", "POST", JOBS, 400, who="admin",
        raw=b'{"item_list": {"items": [1], "batch_size": 1e40}}',
        param="item_list.batch_size"),
    bad("batch-size-2-to-64", "POST", JOBS, 400, who="admin",
        raw=b'{"item_list": {"items": [1], "batch_size": 18446744073709551616}}',
        param="item_list.batch_size"),
    bad("workers-huge", "POST", JOBS, 400, who="admin",
        raw=b'{"item_list": {"items": [1], "batch_size": 1}, "workers": 1e30}',
        param="workers"),
    bad("max-retries-huge", "POST", JOBS, 400, who="admin",
        raw=b'{"item_list": {"items": [1], "batch_size": 1}, "max_retries": 1e30}',
        param="max_retries"),
    bad("workers-zero", "POST", JOBS, 400, json=_job(workers=0), param="workers"),
    bad("workers-string", "POST", JOBS, 400, json=_job(workers="all"), param="workers"),
    bad("config-string", "POST", JOBS, 400, json=_job(config="x"), param="config"),
    bad("config-list", "POST", JOBS, 400, json=_job(config=[1]), param="config"),
    bad("config-empty-list", "POST", JOBS, 400, json=_job(config=[]), param="config"),
    bad("config-false", "POST", JOBS, 400, json=_job(config=False), param="config"),
    bad("timeout-zero", "POST", JOBS, 400, json=_job(timeout=0), param="timeout"),
    bad("timeout-negative", "POST", JOBS, 400, json=_job(timeout=-5), param="timeout"),
    bad("timeout-string", "POST", JOBS, 400, json=_job(timeout="1h"), param="timeout"),
    bad("timeout-bool", "POST", JOBS, 400, json=_job(timeout=True), param="timeout"),
    bad("batch-timeout-zero", "POST", JOBS, 400, json=_job(batch_timeout=0),
        param="batch_timeout"),
    bad("max-retries-negative", "POST", JOBS, 400, json=_job(max_retries=-1),
        param="max_retries"),
    bad("max-retries-string", "POST", JOBS, 400, json=_job(max_retries="3"),
        param="max_retries"),
    bad("error-threshold-low", "POST", JOBS, 400, json=_job(error_threshold=-2),
        param="error_threshold"),
    bad("output-unknown", "POST", JOBS, 400, json=_job(output="csv"), param="output"),
    bad("output-number", "POST", JOBS, 400, json=_job(output=1), param="output"),
    bad("output-path-number", "POST", JOBS, 400, json=_job(output_path=5),
        param="output_path"),
    bad("output-path-empty", "POST", JOBS, 400, json=_job(output_path=""),
        param="output_path"),
    bad("dry-run-string", "POST", JOBS, 400, json=_job(dry_run="yes"), param="dry_run"),
    bad("dry-run-query", "POST", JOBS + "?dry_run=maybe", 400, json=_job(),
        param="dry_run"),
    bad("deployment-number", "POST", JOBS, 400, json=_job(deployment=5),
        param="deployment"),
    bad("deployment-empty", "POST", JOBS, 400, json=_job(deployment=""),
        param="deployment"),
    bad("deployment-unknown", "POST", JOBS, 400, json=_job(deployment="nope"),
        param="deployment", words="no deployment named 'nope'"),
    bad("deployment-not-python", "POST", JOBS, 400, json=_job(deployment="chat"),
        param="deployment"),
    bad("lister-string", "POST", JOBS, 400, json={"file_path_lister": "/data"},
        param="file_path_lister"),
    bad("lister-no-paths", "POST", JOBS, 400, json=_lister(paths=None),
        param="file_path_lister.paths"),
    bad("lister-paths-string", "POST", JOBS, 400, json=_lister(paths="{alpha_root}"),
        param="file_path_lister.paths"),
    bad("lister-paths-number", "POST", JOBS, 400, json=_lister(paths=[1]),
        param="file_path_lister.paths"),
    bad("lister-paths-empty-string", "POST", JOBS, 400, json=_lister(paths=[""]),
        param="file_path_lister.paths"),
    bad("lister-paths-empty", "POST", JOBS, 400, json=_lister(paths=[]),
        param="file_path_lister.paths"),
    bad("lister-missing-dir", "POST", DRY_JOBS, 400,
        json=_lister(paths=["{alpha_root}/no-such-dir"]), param="file_path_lister.paths"),
    bad("lister-glob-open-class", "POST", DRY_JOBS, 400, json=_lister(includes=["[abc"]),
        param="file_path_lister.includes[0]"),
    bad("lister-glob-empty", "POST", DRY_JOBS, 400, json=_lister(excludes=[""]),
        param="file_path_lister.excludes"),
    bad("lister-glob-number", "POST", DRY_JOBS, 400, json=_lister(includes=[7]),
        param="file_path_lister.includes"),
    bad("lister-globs-string", "POST", DRY_JOBS, 400, json=_lister(includes="*.jsonl"),
        param="file_path_lister.includes"),
    bad("lister-globs-empty-string", "POST", DRY_JOBS, 400, json=_lister(excludes=""),
        param="file_path_lister.excludes"),
    bad("lister-no-match", "POST", DRY_JOBS, 400, json=_lister(includes=["*.nothing"]),
        param="file_path_lister.paths"),
    bad("lister-unknown-field", "POST", JOBS, 400, json=_lister(recursive=True),
        param="file_path_lister.recursive"),
    bad("lister-batch-size", "POST", JOBS, 400, json=_lister(batch_size=0),
        param="file_path_lister.batch_size"),
    bad("lister-file-ids-string", "POST", JOBS, 400,
        json=_lister(paths=None, file_ids="{user_file}"), param="file_path_lister.file_ids"),
    bad("lister-file-id-unknown", "POST", DRY_JOBS, 400,
        json=_lister(paths=None, file_ids=["file-doesnotexist"]), words="file-doesnotexist"),
    bad("delimited-not-delimited", "POST", DRY_JOBS, 400,
        json=_lister("delimited_files", paths=["{bad_dir}/notes.txt"]),
        param="delimited_files.paths", words="notes.txt"),
    bad("delimited-ragged-csv", "POST", DRY_JOBS, 400,
        json=_lister("delimited_files", paths=["{bad_dir}/ragged.csv"]), words="ragged.csv"),
    bad("delimited-empty-csv", "POST", DRY_JOBS, 400,
        json=_lister("delimited_files", paths=["{bad_dir}/empty.csv"]), words="empty.csv"),
    bad("delimited-fake-parquet", "POST", DRY_JOBS, 400,
        json=_lister("delimited_files", paths=["{bad_dir}/fake.parquet"]),
        words="fake.parquet"),
    bad("delimited-broken-jsonl", "POST", DRY_JOBS, 400,
        json=_lister("delimited_files", paths=["{bad_dir}/broken.jsonl"]),
        words="broken.jsonl"),
]
JOB_READS = [
    bad("jobs-limit-zero", "GET", "/api/v1/jobs?limit=0", 400, param="limit"),
    bad("jobs-limit-over", "GET", "/api/v1/jobs?limit=101", 400, param="limit"),
    bad("jobs-limit-text", "GET", "/api/v1/jobs?limit=x", 400, param="limit"),
    bad("jobs-limit-huge", "GET", "/api/v1/jobs?limit=" + "9" * 30, 400, param="limit"),
    bad("jobs-status-unknown", "GET", "/api/v1/jobs?status=done", 400, param="status"),
    bad("job-unknown", "GET", "/api/v1/jobs/job_doesnotexist", 404),
    bad("job-stop-unknown", "DELETE", "/api/v1/jobs/job_doesnotexist", 404),
    bad("job-logs-unknown", "GET", "/api/v1/jobs/job_doesnotexist/logs", 404),
    bad("job-logs-after-text", "GET", "/api/v1/jobs/{job}/logs?after=start", 400,
        param="after"),
    bad("job-logs-follow-text", "GET", "/api/v1/jobs/{job}/logs?follow=sometimes", 400,
        param="follow"),
    bad("job-results-unknown", "GET", "/api/v1/jobs/job_doesnotexist/results", 404),
    bad("job-is-a-batch", "GET", "/api/v1/jobs/{openai_batch}", 404),
]
ADMIN = [
    bad("endpoint-name-missing", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(name=None)),
    bad("endpoint-name-slash", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(name="a/b")),
    bad("endpoint-name-number", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(name=5)),
    bad("endpoint-no-deployments", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(deployments=[])),
    bad("endpoint-deployments-string", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(deployments="echo")),
    bad("endpoint-backend-unknown", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(deployments=[{"name": "e", "backend": "magic"}])),
    bad("endpoint-default-unknown", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(default_deployment="nope")),
    bad("endpoint-duplicate-deployments", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(deployments=[{"name": "e", "backend": "echo"}] * 2)),
    bad("endpoint-project-number", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(project=5)),
    bad("endpoint-name-taken", "POST", "/api/v1/endpoints", 409, who="admin",
        json=_endpoint(name="shared"), words="The name 'shared' is not available."),
    bad("endpoint-name-taken-by-model", "POST", "/api/v1/endpoints", 409, who="admin",
        json=_endpoint(name="echo"), words="The name 'echo' is not available."),
    bad("echo-latency-negative", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_echo(options={"latency_ms": -1})),
    bad("echo-latency-string", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_echo(options={"latency_ms": "slow"})),
    bad("echo-option-unknown", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_echo(options={"temperature_of_sun": 1})),
    bad("workers-not-object", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_echo(workers=4)),
    bad("workers-min-over-max", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_echo(workers={"min": 3, "max": 2})),
    bad("workers-idle-negative", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_echo(workers={"max": 1, "idle_seconds": -1})),
    bad("openai-base-url-number", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(deployments=[{"name": "o", "backend": "openai",
                                     "options": {"base_url": 123}}])),
    bad("openai-base-url-missing", "POST", "/api/v1/endpoints", 400, who="admin",
        json=_endpoint(deployments=[{"name": "o", "backend": "openai", "options": {}}])),
    bad("patch-default-number", "PATCH", "/api/v1/endpoints/alpha-bad", 400, who="admin",
        json={"default_deployment": 3}, param="default_deployment"),
    bad("patch-default-unknown", "PATCH", "/api/v1/endpoints/alpha-bad", 404, who="admin",
        json={"default_deployment": "nope"}),
    bad("add-deployment-taken", "POST", "/api/v1/endpoints/alpha-bad/deployments", 409,
        who="admin", json={"name": "e", "backend": "echo"}),
    bad("endpoint-json-broken", "POST", "/api/v1/endpoints", 400, who="admin",
        raw=b'{"name": "x", '),
    bad("key-role-unknown", "POST", "/api/v1/keys", 400, who="admin",
        json={"project": "alpha", "role": "root"}, param="role"),
    bad("key-project-missing", "POST", "/api/v1/keys", 400, who="admin",
        json={"role": "member"}, code="missing_required_parameter", param="project"),
    bad("key-project-empty", "POST", "/api/v1/keys", 400, who="admin",
        json={"project": "", "role": "member"}, param="project"),
    bad("key-project-slash", "POST", "/api/v1/keys", 400, who="admin",
        json={"project": "a/b", "role": "member"}, param="project"),
    bad("key-name-number", "POST", "/api/v1/keys", 400, who="admin",
        json={"project": "alpha", "role": "member", "name": 5}, param="name"),
    bad("key-unknown-field", "POST", "/api/v1/keys", 400, who="admin",
        json={"project": "alpha", "role": "member", "expires": 1}, param="expires"),
    bad("key-revoke-unknown", "DELETE", "/api/v1/keys/nobody", 404, who="admin"),
]
CASES = FILES + BATCHES + MESSAGES + JOB_SUBMISSIONS + JOB_READS + ADMIN


# -- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ids(site: Site, alpha: httpx.Client, admin: httpx.Client) -> Iterator[dict[str, str]]:
    """What the rows refer to: alpha's files, a finished batch of each kind, a job, a
    directory of broken data files, and an endpoint of alpha's."""
    bad_dir = site.alpha_root / "bad"
    bad_dir.mkdir(exist_ok=True)
    for name, content in [("notes.txt", b"hello"), ("ragged.csv", b"a,b\n1,2\n3\n4,5,6\n"),
                          ("empty.csv", b""), ("fake.parquet", b"PAR1 not really"),
                          ("broken.jsonl", b'{"x": 1}\n{"x": \n')]:
        (bad_dir / name).write_bytes(content)
    openai_batch = create_batch(alpha, jsonl(chat_line("r1")))["id"]
    message = alpha.post("/v1/messages/batches", json={"requests": [_message()]})
    assert message.status_code == 200, message.text
    job = alpha.post(JOBS, json=_items())
    assert job.status_code == 200, job.text
    endpoint = admin.post("/api/v1/endpoints", json=_endpoint(name="alpha-bad",
                                                              project="alpha"))
    assert endpoint.status_code == 200, endpoint.text
    assert wait_batch(alpha, openai_batch)["status"] == "completed"
    wait_message_batch(alpha, message.json()["id"])
    yield {"batch_file": upload(alpha, jsonl(chat_line("r1"))),
           "user_file": upload(alpha, b'{"x": 1}\n', purpose="user_data",
                               filename="data.jsonl"),
           "openai_batch": openai_batch, "message_batch": message.json()["id"],
           "job": job.json()["id"], "alpha_root": str(site.alpha_root),
           "bad_dir": str(bad_dir)}
    admin.delete("/api/v1/endpoints/alpha-bad")


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**ids) if "{" in value else value
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def _send(client: httpx.Client, case: Bad, ids: dict[str, str]) -> httpx.Response:
    path = _fill(case.path, ids)
    if case.form is not None or case.file is not None:
        files = {"file": (case.file[0], case.file[1], "application/octet-stream")} \
            if case.file else None
        return client.request(case.method, path, data=case.form, files=files)
    headers = {"content-type": "application/json", **case.headers}
    if case.raw is not None:
        return client.request(case.method, path, content=case.raw, headers=headers)
    if case.json is ANY:
        return client.request(case.method, path, headers=case.headers)
    body = orjson.dumps(_fill(case.json, ids))
    return client.request(case.method, path, content=body, headers=headers)


def _check_anthropic(response: httpx.Response, case: Bad) -> str:
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["request_id"] == response.headers["request-id"], body
    if case.code is not ANY:
        assert body["error"]["type"] == case.code, body
    message: str = body["error"]["message"]
    return message


def _check_openai(response: httpx.Response, case: Bad) -> str:
    error = openai_error(response)
    assert error["type"] == "invalid_request_error", error
    if case.code is not ANY:
        assert error["code"] == case.code, error
    if case.param is not ANY:
        assert error["param"] == case.param, error
    message: str = error["message"]
    return message


def _undo(site: Site, response: httpx.Response) -> None:
    """A bad request that got through must not change what the next rows meet."""
    if response.status_code != 200 or response.request.method != "POST":
        return
    body = response.json()
    if body.get("object") == "endpoint":
        site.client("admin").delete(f"/api/v1/endpoints/{body['name']}")
    elif body.get("object") == "job":
        site.client("alpha").delete(f"/api/v1/jobs/{body['id']}")
    elif body.get("object") == "api_key":
        site.client("admin").delete(f"/api/v1/keys/{body['name']}")


@pytest.mark.parametrize("case", CASES)
def test_a_bad_request_is_refused_with_the_right_error(site: Site, ids: dict[str, str],
                                                       case: Bad) -> None:
    response = _send(site.client(case.who), case, ids)
    _undo(site, response)
    assert response.status_code == case.status, response.text[:600]
    if _fill(case.path, ids).startswith("/v1/messages"):
        message = _check_anthropic(response, case)
    else:
        message = _check_openai(response, case)
    assert case.words in message, message
    if case.status == 409:  # the SDKs retry a 409 unless told it will not pass
        assert response.headers["x-should-retry"] == "false"
    if case.status == 405:
        allowed = response.headers["allow"].split(", ")
        assert allowed and case.method not in allowed, allowed


@pytest.mark.parametrize("cursor", ["garbage", "batch_" + "f" * 32, "'; DROP TABLE batches; --",
                                    "%00", "x" * 3000])
@pytest.mark.parametrize(("path", "name"), [
    ("/v1/files", "after"), ("/v1/batches", "after"), ("/v1/messages/batches", "after_id"),
    ("/v1/messages/batches", "before_id"), ("/api/v1/jobs", "after")])
def test_an_unknown_cursor_gives_an_empty_page(alpha: httpx.Client, ids: dict[str, str],
                                               path: str, name: str, cursor: str) -> None:
    assert alpha.get(path).json()["data"], "the listing must not be empty to begin with"
    response = alpha.get(path, params={name: cursor})
    assert response.status_code == 200, response.text
    page = response.json()
    assert (page["data"], page["has_more"], page["first_id"], page["last_id"]) == \
        ([], False, None, None), page


# -- lines of an OpenAI batch input file: refused when the batch is validated -----------

def _line(**changes: Any) -> dict[str, Any]:
    line = chat_line("r1")
    return {k: v for k, v in {**line, **changes}.items() if v is not None}


def _body(**changes: Any) -> dict[str, Any]:
    body = chat_line("r1")["body"]
    return _line(body={k: v for k, v in {**body, **changes}.items() if v is not None})


#: One error of a failed batch: (code, param, line).
LineError = tuple[str, str | None, int | None]


def line_case(name: str, content: bytes | list[Any], *errors: LineError) -> Any:
    data = content if isinstance(content, bytes) else b"".join(
        (c if isinstance(c, bytes) else orjson.dumps(c)) + b"\n" for c in content)
    return pytest.param(data, list(errors), id=name)


LINES = [
    line_case("empty-file", b"", ("empty_file", None, None)),
    line_case("blank-lines-only", b"\n\n  \n", ("empty_file", None, None)),
    line_case("csv-not-jsonl", b"custom_id,model\nr1,echo\n",
              ("invalid_json_line", None, 1), ("invalid_json_line", None, 2)),
    line_case("truncated-json", [_line(), b'{"custom_id": "r2", "method": '],
              ("invalid_json_line", None, 2)),
    line_case("line-is-array", [[1, 2]], ("invalid_request", None, 1)),
    line_case("line-is-string", ["just text"], ("invalid_request", None, 1)),
    line_case("custom-id-missing", [_line(custom_id=None)],
              ("missing_required_parameter", "custom_id", 1)),
    line_case("custom-id-number", [_line(custom_id=7)], ("invalid_request", "custom_id", 1)),
    line_case("custom-id-empty", [_line(custom_id="")], ("invalid_request", "custom_id", 1)),
    line_case("custom-id-duplicate", [_line(), _line(), _line(custom_id="r2"), _line()],
              ("duplicate_custom_id", "custom_id", 2), ("duplicate_custom_id", "custom_id", 4)),
    line_case("method-missing", [_line(method=None)],
              ("missing_required_parameter", "method", 1)),
    line_case("method-get", [_line(method="GET")], ("invalid_request", "method", 1)),
    line_case("url-missing", [_line(url=None)], ("missing_required_parameter", "url", 1)),
    line_case("url-mismatch", [_line(url="/v1/embeddings")], ("invalid_url", "url", 1)),
    line_case("body-missing", [_line(body=None)], ("missing_required_parameter", "body", 1)),
    line_case("body-string", [_line(body="hi")], ("invalid_request", "body", 1)),
    line_case("model-missing", [_body(model=None)],
              ("invalid_request", "body.model", 1)),
    line_case("model-unknown", [_body(model="nonexistent-model-xyz")],
              ("model_not_found", "body.model", 1)),
    line_case("model-number", [_body(model=5)], ("model_not_found", "body.model", 1)),
    line_case("stream-true", [_body(stream=True)],
              ("streaming_unsupported", "body.stream", 1)),
    line_case("every-bad-line-reported", [_line(), _line(custom_id="r2", url="/v1/embeddings"),
                                          "x", {**_body(model="nope"), "custom_id": "r4"}],
              ("invalid_url", "url", 2), ("invalid_request", None, 3),
              ("model_not_found", "body.model", 4)),
]


@pytest.mark.parametrize(("content", "expected"), LINES)
def test_a_bad_input_file_fails_its_batch(alpha: httpx.Client, content: bytes,
                                          expected: list[LineError]) -> None:
    batch = wait_batch(alpha, create_batch(alpha, content)["id"])
    assert batch["status"] == "failed", batch
    assert batch["failed_at"] is not None and batch["errors"]["object"] == "list", batch
    errors = batch["errors"]["data"]
    assert [(e["code"], e["param"], e["line"]) for e in errors] == expected, errors
    assert all(e["message"] for e in errors)


@pytest.mark.parametrize("input_file_id", ["file-doesnotexist", "{beta_file}"])
def test_a_missing_input_file_fails_the_batch(site: Site, alpha: httpx.Client,
                                              beta: httpx.Client, input_file_id: str) -> None:
    """As hosted: not a create-time error; the batch fails, naming `file_id`, alike for a
    file that does not exist and another project's."""
    file_id = input_file_id.format(beta_file=upload(beta, jsonl(chat_line("r1"))))
    created = alpha.post("/v1/batches", json=_batch(input_file_id=file_id))
    assert created.status_code == 200, created.text
    batch = wait_batch(alpha, created.json()["id"])
    assert batch["status"] == "failed", batch
    (error,) = batch["errors"]["data"]
    assert (error["code"], error["param"], error["line"]) == ("invalid_request", "file_id",
                                                              None), error
    assert file_id in error["message"]


# -- Anthropic params: checked per request, as on the hosted API ------------------------

PARAMS = [
    pytest.param(_message(max_tokens=None)["params"], id="max-tokens-missing"),
    pytest.param(_message(max_tokens="many")["params"], id="max-tokens-string"),
    pytest.param(_message(max_tokens=0)["params"], id="max-tokens-zero"),
    pytest.param(_message(messages=None)["params"], id="messages-missing"),
    pytest.param(_message(messages=[])["params"], id="messages-empty"),
    pytest.param(_message(messages="hi")["params"], id="messages-string"),
    pytest.param(_message(messages=[{"role": "system", "content": "hi"}])["params"],
                 id="role-system"),
    pytest.param(_message(messages=[{"role": "user", "content": 5}])["params"],
                 id="content-number"),
    pytest.param(_message(system=5)["params"], id="system-number"),
    pytest.param(_message(model="nonexistent-model-xyz")["params"], id="model-unknown"),
]


@pytest.fixture(scope="module")
def param_results(alpha: httpx.Client) -> dict[str, Any]:
    """One message batch holding every bad `params`, and a good request beside them."""
    requests = [{"custom_id": f"r{i}", "params": p.values[0]} for i, p in enumerate(PARAMS)]
    requests.append(_message("good"))
    created = alpha.post("/v1/messages/batches", json={"requests": requests})
    assert created.status_code == 200, created.text
    batch = wait_message_batch(alpha, created.json()["id"])
    counts = batch["request_counts"]
    assert (counts["succeeded"], counts["errored"]) == (1, len(PARAMS)), counts
    results = alpha.get(f"/v1/messages/batches/{batch['id']}/results")
    return {row["custom_id"]: row["result"]
            for row in map(orjson.loads, results.content.splitlines())}


@pytest.mark.parametrize("params", PARAMS)
def test_bad_message_params_end_as_errored_results(param_results: dict[str, Any],
                                                   params: dict[str, Any]) -> None:
    index = next(i for i, p in enumerate(PARAMS) if p.values[0] == params)
    result = param_results[f"r{index}"]
    assert result["type"] == "errored", result
    error = result["error"]
    assert error["type"] == "error" and error["error"]["message"], error
    expected = "not_found_error" if params["model"] != "echo" else "invalid_request_error"
    assert error["error"]["type"] == expected, error
    assert param_results["good"]["type"] == "succeeded"

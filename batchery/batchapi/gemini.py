"""Gemini Batch Mode (the Developer API) on the same engine as OpenAI batches.

A Gemini batch's requests (`GenerateContentRequest`s, inline or in an uploaded JSONL file)
are translated to chat completion requests and written to an internal JSONL file of
`/v1/chat/completions` lines (an embeddings batch's `EmbedContentRequest`s to
`/v1/embeddings` lines); from there the batch is validated, chunked, run, cancelled and
expired like any other. Its id starts with `GEMINI_ID_PREFIX`, which keeps it out of the
OpenAI batch API. Once it has ended, its answers are translated back into one results file,
in the order of the requests: `GenerateContentResponse`s or errors, keyed as the input was.
"""

from __future__ import annotations

import contextlib
import heapq
import io
import mimetypes
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from sqlalchemy.exc import IntegrityError

from batchery import backends
from batchery.model import ids
from batchery.model.batches import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_TASKS, Batch, BatchStatus
from batchery.model.exceptions import InvalidRequest, NotFound
from batchery.model.files import INTERNAL_PURPOSE_PREFIX, FileRecord, Purpose
from batchery.model.priority import DEFAULT_PRIORITY, parse_priority
from batchery.ports.backend import CHAT_ENDPOINT
from batchery.ports.filestore import FileStore
from batchery.ports.store import BatchApiStore, Page

#: Every Gemini batch's id starts so; no OpenAI or Anthropic batch id does.
GEMINI_ID_PREFIX = "gbatch-"
#: The internal files of Gemini batches: their chat lines, and an inline batch's answers.
#: Internal purposes are never listed or served by the files APIs.
INPUT_PURPOSE = f"{INTERNAL_PURPOSE_PREFIX}_gemini"
INLINE_RESULTS_PURPOSE = f"{INTERNAL_PURPOSE_PREFIX}_gemini_out"
#: Files uploaded through the Gemini Files API: any content, as OpenAI's `user_data`.
UPLOAD_PURPOSE = "user_data"
#: Uploaded files live 48 hours, as on the hosted API.
FILE_TTL_S = 48 * 3600
#: Gemini batches end 24 hours after creation unless the server is told otherwise.
WINDOW_S = 86_400
_API = "type.googleapis.com/google.ai.generativelanguage.v1beta"
EMBEDDINGS_ENDPOINT = "/v1/embeddings"
#: What a batch of each endpoint is called: `batchGenerateContent` makes GenerateContent
#: batches, `asyncBatchEmbedContent` EmbedContent ones.
_KINDS = {CHAT_ENDPOINT: ("GenerateContentBatch", "batchGenerateContent"),
          EMBEDDINGS_ENDPOINT: ("EmbedContentBatch", "asyncBatchEmbedContent")}

# -- errors: google.rpc status names and codes -------------------------------------------

#: The canonical codes of google.rpc.Code, by name.
CANONICAL_CODES = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3,
                   "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5, "ALREADY_EXISTS": 6,
                   "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
                   "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13,
                   "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
_STATUS_BY_HTTP = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                   404: "NOT_FOUND", 405: "UNIMPLEMENTED", 409: "ABORTED",
                   413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
                   500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
                   504: "DEADLINE_EXCEEDED"}
#: Where the Gemini API is served: `/gemini/...` for `base_url=http://host/gemini` (either
#: API version), and `/v1beta/...` at the root as on the hosted API. `/v1` at the root is
#: OpenAI's.
MOUNTS = ("/gemini/v1beta", "/gemini/v1", "/v1beta")
UPLOAD_MOUNTS = ("/gemini/upload/v1beta", "/gemini/upload/v1", "/upload/v1beta")


def is_gemini_path(path: str) -> bool:
    return any(path == m or path.startswith(m + "/") for m in MOUNTS + UPLOAD_MOUNTS) \
        or path.startswith("/gemini/")


def status_name(http_status: int) -> str:
    """The google.rpc status name of an HTTP status."""
    if http_status in _STATUS_BY_HTTP:
        return _STATUS_BY_HTTP[http_status]
    return "INTERNAL" if http_status >= 500 else "FAILED_PRECONDITION"


def error_body(http_status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """Google's JSON error envelope. `code`, when it is a status name, names the status
    (FAILED_PRECONDITION is a 400 too); `param` becomes a BadRequest field violation."""
    status = code if code in CANONICAL_CODES else status_name(http_status)
    error: dict[str, Any] = {"code": http_status, "message": message, "status": status}
    if param:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                             "fieldViolations": [{"field": param, "description": message}]}]
    return {"error": error}


def rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _rpc_status(name: str, message: str) -> dict[str, Any]:
    """A google.rpc.Status, as a batch and its per-request errors carry it."""
    return {"code": CANONICAL_CODES[name], "message": message}


# -- reading Gemini JSON: proto field names in lowerCamel or as written in the proto ------

def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


def field(obj: dict[str, Any], camel: str) -> Any:
    """A proto field by its JSON name (`maxOutputTokens`) or its proto name
    (`max_output_tokens`): the hosted API reads both."""
    value = obj.get(camel)
    return obj.get(_snake(camel)) if value is None else value


def _bad(where: str, expected: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value at '{where}': expected {expected}.", param=where)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, "an object")
    return value


# -- GenerateContentRequest -> chat completion request ---------------------------------

#: generationConfig fields that map one to one onto chat parameters.
_SAME = {"temperature": "temperature", "topP": "top_p", "topK": "top_k",
         "candidateCount": "n", "maxOutputTokens": "max_tokens", "stopSequences": "stop",
         "presencePenalty": "presence_penalty", "frequencyPenalty": "frequency_penalty",
         "seed": "seed", "responseLogprobs": "logprobs", "logprobs": "top_logprobs"}
#: Request fields a chat completion cannot express: refused rather than dropped.
_UNSUPPORTED = ("tools", "toolConfig", "cachedContent")
_ROLES = {"user": "user", "model": "assistant"}


def _text(content: Any, where: str) -> str:
    """The text of a `Content`: its text parts, joined."""
    parts = field(_object(content, where), "parts")
    if not isinstance(parts, list) or not parts:
        raise _bad(f"{where}.parts", "a non-empty list of parts")
    texts = []
    for i, part in enumerate(parts):
        text = part.get("text") if isinstance(part, dict) else None
        if not isinstance(text, str):
            raise InvalidRequest(f"Invalid value at '{where}.parts[{i}]': only text parts are "
                                 f"supported (this server answers Gemini requests with chat "
                                 f"models).", param=f"{where}.parts[{i}]")
        texts.append(text)
    return "".join(texts)


def _message(content: Any, where: str) -> dict[str, str]:
    role = _object(content, where).get("role") or "user"
    if role not in _ROLES:
        raise InvalidRequest(f"Invalid value at '{where}.role': expected 'user' or 'model', "
                             f"got {orjson.dumps(role).decode()}.", param=f"{where}.role")
    return {"role": _ROLES[role], "content": _text(content, where)}


def _lower_types(schema: Any) -> Any:
    """A Gemini `Schema` (types in capitals: OBJECT, STRING) as a JSON Schema."""
    if isinstance(schema, list):
        return [_lower_types(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: (v.lower() if k == "type" and isinstance(v, str) else _lower_types(v))
            for k, v in schema.items()}


def _response_format(config: dict[str, Any]) -> dict[str, Any] | None:
    schema = field(config, "responseJsonSchema")
    if schema is None and field(config, "responseSchema") is not None:
        schema = _lower_types(field(config, "responseSchema"))
    if schema is not None:
        return {"type": "json_schema",
                "json_schema": {"name": "response", "schema": schema}}
    if field(config, "responseMimeType") == "application/json":
        return {"type": "json_object"}
    return None


def _generation(config: Any, where: str) -> dict[str, Any]:
    """The chat parameters of a `generationConfig`. Fields without a chat counterpart
    (thinking, modalities, speech) do not change a text answer's shape and are left out."""
    if config is None:
        return {}
    config = _object(config, where)
    params = {chat: value for gemini, chat in _SAME.items()
              if (value := field(config, gemini)) is not None}
    response_format = _response_format(config)
    if response_format is not None:
        params["response_format"] = response_format
    return params


def _check_model(request: dict[str, Any], model: str, where: str) -> None:
    named = request.get("model")
    if named is not None and named not in (model, f"models/{model}"):
        raise InvalidRequest(f"Invalid value at '{where}.model': every request of a batch "
                             f"uses the batch's model 'models/{model}', not "
                             f"{orjson.dumps(named).decode()}.", param=f"{where}.model")


def to_embedding(request: Any, model: str, where: str) -> dict[str, Any]:
    """An `EmbedContentRequest` as an embeddings request for deployment `model`. Its
    `taskType` and `title` have no counterpart and do not change the answer's shape."""
    request = _object(request, where)
    _check_model(request, model, where)
    body: dict[str, Any] = {"model": model,
                            "input": _text(request.get("content"), f"{where}.content")}
    dimensions = field(request, "outputDimensionality")
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


def to_chat(request: Any, model: str, where: str) -> dict[str, Any]:
    """A `GenerateContentRequest` as a chat completion request for deployment `model`.
    Raises InvalidRequest naming the field (`where` is the request's own path)."""
    request = _object(request, where)
    _check_model(request, model, where)
    for name in _UNSUPPORTED:
        if field(request, name) is not None:
            raise InvalidRequest(f"Invalid value at '{where}.{name}': {name} is not supported "
                                 f"in batches on this server.", param=f"{where}.{name}")
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        raise InvalidRequest(f"Invalid value at '{where}.contents': a request needs a "
                             f"non-empty list of contents.", param=f"{where}.contents")
    messages = []
    system = field(request, "systemInstruction")
    if system is not None:
        messages.append({"role": "system",
                         "content": _text(system, f"{where}.systemInstruction")})
    messages += [_message(c, f"{where}.contents[{i}]") for i, c in enumerate(contents)]
    body: dict[str, Any] = {"model": model, "messages": messages}
    body.update(_generation(field(request, "generationConfig"), f"{where}.generationConfig"))
    return body


# -- chat completion -> GenerateContentResponse -----------------------------------------

_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY",
           "tool_calls": "STOP", "function_call": "STOP"}
#: How a request that never got an answer is reported, by the engine's code.
_UNRUN = {"batch_cancelled": "CANCELLED", "batch_expired": "DEADLINE_EXCEEDED"}


def _candidate(choice: dict[str, Any], index: int) -> dict[str, Any]:
    message = choice.get("message") or {}
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep their text
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {"content": {"role": "model", "parts": [{"text": content or ""}]},
            "finishReason": _FINISH.get(str(choice.get("finish_reason")), "OTHER"),
            "index": choice.get("index", index)}


def generate_content_response(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat completion as a `GenerateContentResponse`."""
    choices = body.get("choices") or []
    usage = body.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    answer = int(usage.get("completion_tokens") or 0)
    return {"candidates": [_candidate(c, i) for i, c in enumerate(choices)
                           if isinstance(c, dict)],
            "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": answer,
                              "totalTokenCount": int(usage.get("total_tokens")
                                                     or prompt + answer)},
            "modelVersion": body.get("model") or model,
            "responseId": str(body.get("id") or "")}


def _error_of(line: dict[str, Any]) -> dict[str, Any]:
    """The google.rpc.Status of an engine error line."""
    response = line.get("response")
    if isinstance(response, dict):
        body = response.get("body")
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        status = int(response.get("status_code") or 500)
        return _rpc_status(status_name(status), str(message or body))
    error = line.get("error") or {}
    return _rpc_status(_UNRUN.get(str(error.get("code")), "INTERNAL"),
                       str(error.get("message") or "The request was not run."))


def embed_content_response(body: dict[str, Any]) -> dict[str, Any]:
    """An embeddings answer (one input) as a `SingleEmbedContentResponse`."""
    data = body.get("data") or [{}]
    usage = body.get("usage") or {}
    return {"embedding": {"values": data[0].get("embedding") or []},
            "tokenCount": int(usage.get("prompt_tokens") or 0)}


def result_of(line: dict[str, Any], model: str,
              endpoint: str = CHAT_ENDPOINT) -> dict[str, Any]:
    """An engine output or error line as `{"response": …}` or `{"error": …}`."""
    response = line.get("response")
    if isinstance(response, dict) and response.get("status_code") == 200 \
            and isinstance(response.get("body"), dict):
        body = response["body"]
        return {"response": embed_content_response(body) if endpoint == EMBEDDINGS_ENDPOINT
                else generate_content_response(body, model)}
    return {"error": _error_of(line)}


# -- custom ids: the request's place in the batch, and its key --------------------------

def custom_id(index: int, key: str | None) -> str:
    return str(index) if key is None else f"{index}:{key}"


def parse_custom_id(value: str) -> tuple[int, str | None]:
    index, sep, key = value.partition(":")
    return int(index), (key if sep else None)


# -- batches ----------------------------------------------------------------------------

_STATES = {BatchStatus.VALIDATING: "BATCH_STATE_PENDING",
           BatchStatus.IN_PROGRESS: "BATCH_STATE_RUNNING",
           BatchStatus.PAUSED: "BATCH_STATE_RUNNING",
           BatchStatus.FINALIZING: "BATCH_STATE_RUNNING",
           BatchStatus.CANCELLING: "BATCH_STATE_RUNNING",
           BatchStatus.COMPLETED: "BATCH_STATE_SUCCEEDED",
           BatchStatus.FAILED: "BATCH_STATE_FAILED",
           BatchStatus.CANCELLED: "BATCH_STATE_CANCELLED",
           BatchStatus.EXPIRED: "BATCH_STATE_EXPIRED"}
#: Ended batches whose requests have answers to report (a failed one never ran).
_ANSWERED = frozenset({BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.EXPIRED})


def state(batch: Batch) -> str:
    return _STATES[batch.status]


def batch_id() -> str:
    return GEMINI_ID_PREFIX + secrets.token_hex(12)


def results_file_id(batch: Batch) -> str:
    return f"file-{batch.id}-results"


@dataclass(frozen=True, slots=True)
class Info:
    """What a Gemini batch keeps beside the engine's batch (in its `metadata`)."""

    model: str
    display_name: str | None
    #: `files/<id>` for a file batch, None for inline requests.
    source_file: str | None
    requests: int
    #: Inline requests' own metadata, by their index.
    request_metadata: dict[int, Any]

    def to_metadata(self) -> dict[str, str]:
        data = {"model": self.model, "requests": str(self.requests)}
        if self.display_name is not None:
            data["display_name"] = self.display_name
        if self.source_file is not None:
            data["source_file"] = self.source_file
        if self.request_metadata:
            data["request_metadata"] = orjson.dumps(
                {str(k): v for k, v in self.request_metadata.items()}).decode()
        return data

    @classmethod
    def of(cls, batch: Batch) -> Info:
        data = batch.metadata or {}
        metadata = orjson.loads(data.get("request_metadata", "{}"))
        return cls(model=data.get("model", ""), display_name=data.get("display_name"),
                   source_file=data.get("source_file"), requests=int(data.get("requests", 0)),
                   request_metadata={int(k): v for k, v in metadata.items()})


def _updated(batch: Batch) -> int:
    times = (batch.created_at, batch.in_progress_at, batch.finalizing_at, batch.completed_at,
             batch.failed_at, batch.expired_at, batch.cancelling_at, batch.cancelled_at)
    return max(t for t in times if t is not None)


def _ended(batch: Batch) -> int | None:
    if not batch.status.is_terminal:
        return None
    return batch.completed_at or batch.cancelled_at or batch.expired_at or batch.failed_at


def batch_stats(batch: Batch, requests: int) -> dict[str, str]:
    """`batchStats`: int64 counts as strings, zeros left out (proto3 JSON)."""
    succeeded = 0 if batch.status is BatchStatus.FAILED else batch.completed
    # Once a batch has ended, every request without an answer has failed (a batch
    # cancelled before it started has no engine counts at all).
    failed = requests - succeeded if batch.status.is_terminal else batch.failed
    counts = {"requestCount": requests, "successfulRequestCount": succeeded,
              "failedRequestCount": failed,
              "pendingRequestCount": max(requests - succeeded - failed, 0)}
    return {name: str(n) for name, n in counts.items() if n}


def _failure(batch: Batch) -> dict[str, Any]:
    problems = [f"line {e.line}: {e.message}" if e.line else e.message
                for e in batch.errors or []]
    return _rpc_status("INVALID_ARGUMENT", "; ".join(problems) or "The batch failed.")


def operation(batch: Batch, output: dict[str, Any] | None) -> dict[str, Any]:
    """The batch as the long-running `Operation` the API returns, its `GenerateContentBatch`
    in `metadata`. `output` is the batch's `GenerateContentBatchOutput` once it has one."""
    info = Info.of(batch)
    name = f"batches/{batch.id}"
    kind = _KINDS.get(batch.endpoint, _KINDS[CHAT_ENDPOINT])[0]
    metadata: dict[str, Any] = {
        "@type": f"{_API}.{kind}", "name": name, "model": info.model,
        "displayName": info.display_name or "",
        "createTime": rfc3339(batch.created_at), "updateTime": rfc3339(_updated(batch)),
        "batchStats": batch_stats(batch, info.requests), "state": state(batch),
        # An int64, which protobuf's JSON writes as a string.
        "priority": str(batch.priority)}
    if info.source_file is not None:
        metadata["inputConfig"] = {"fileName": info.source_file}
    ended = _ended(batch)
    if ended is not None:
        metadata["endTime"] = rfc3339(ended)
    if output is not None:
        metadata["output"] = output
    result: dict[str, Any] = {"name": name, "metadata": metadata,
                              "done": batch.status.is_terminal}
    if batch.status is BatchStatus.FAILED:
        result["error"] = _failure(batch)
    elif output is not None and batch.status.is_terminal:
        result["response"] = {"@type": f"{_API}.{kind}Output", **output}
    return result


# -- reading the engine's answers in request order --------------------------------------

#: Past this many ascending runs, answers are put in order in memory instead.
_MAX_RUNS = 32


def _index_of(raw: bytes) -> int:
    return parse_custom_id(orjson.loads(raw)["custom_id"])[0]


def _runs(files: FileStore, key: str) -> list[tuple[int, int]]:
    """The byte ranges of a file in which the requests' indexes ascend. The engine writes
    a chunk's answers in order and its chunks in order: a file is one or two runs."""
    runs, start, offset, last = [], 0, 0, -1
    with files.open_read(key) as stream:
        for raw in stream:
            if raw.strip():
                index = _index_of(raw)
                if index < last:
                    runs.append((start, offset))
                    start = offset
                last = index
            offset += len(raw)
    if offset > start:
        runs.append((start, offset))
    return runs


def _read_run(files: FileStore, key: str, start: int, end: int
              ) -> Iterator[tuple[int, bytes]]:
    with files.open_read(key) as stream:
        stream.seek(start)
        offset = start
        while offset < end:
            raw = stream.readline()
            if not raw:
                return
            offset += len(raw)
            if raw.strip():
                yield _index_of(raw), raw


def ordered_answers(files: FileStore, keys: Iterable[str]) -> Iterator[tuple[int, bytes]]:
    """`(index, line)` for every line of the engine's result files, by request index."""
    runs = [(key, start, end) for key in keys for start, end in _runs(files, key)]
    if len(runs) <= _MAX_RUNS:
        yield from heapq.merge(*(_read_run(files, *run) for run in runs),
                               key=lambda item: item[0])
        return
    everything = [item for run in runs for item in _read_run(files, *run)]
    everything.sort(key=lambda item: item[0])
    yield from everything


# -- the service --------------------------------------------------------------------------

#: Turns one request into the engine's body: `(request, model, where) -> body`.
Translate = Callable[[Any, str, str], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class _Request:
    key: str | None
    body: dict[str, Any]
    metadata: Any = None


class GeminiBatchService:
    def __init__(self, store: BatchApiStore, files: FileStore, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_requests: int = DEFAULT_MAX_TASKS, window_s: int = WINDOW_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.files = files
        self.chunk_size = chunk_size
        self.max_requests = max_requests
        self.window_s = window_s
        self.clock = clock

    # -- create ----------------------------------------------------------------------

    def model(self, project: str, name: str, version: str,
              endpoint: str = CHAT_ENDPOINT) -> str:
        """The deployment a `models/…` path names, if `project` may use it for `endpoint`
        (chat for GenerateContent batches, embeddings for EmbedContent ones)."""
        for deployment in self.store.list_deployments():
            if deployment.name == name and deployment.usable_by(project) \
                    and endpoint in backends.endpoints_of(deployment):
                return name
        raise NotFound(f"models/{name} is not found for API version {version}, or is not "
                       f"supported for {_KINDS[endpoint][1]}.", param="model")

    def create(self, project: str, model: str, body: dict[str, Any],
               endpoint: str = CHAT_ENDPOINT) -> Batch:
        """A batch of `body` (`{"batch": GenerateContentBatch}`, or an EmbedContentBatch
        for the embeddings endpoint) on deployment `model`."""
        translate = to_embedding if endpoint == EMBEDDINGS_ENDPOINT else to_chat
        spec = _object(body.get("batch"), "batch")
        display = field(spec, "displayName")
        if display is not None and not isinstance(display, str):
            raise _bad("batch.display_name", "a string")
        rank = parse_priority(field(spec, "priority"), "batch.priority", digits=True)
        config = _object(field(spec, "inputConfig"), "batch.input_config")
        file_name, inline = field(config, "fileName"), config.get("requests")
        if (file_name is None) == (inline is None):
            raise InvalidRequest("Invalid value at 'batch.input_config': give exactly one of "
                                 "'file_name' and 'requests'.", param="batch.input_config")
        if inline is not None:
            requests = self._inline(inline, model, translate)
        else:
            requests = self._from_file(project, file_name, model, translate)
        info = Info(model=f"models/{model}", display_name=display,
                    source_file=file_name, requests=len(requests),
                    request_metadata={i: r.metadata for i, r in enumerate(requests)
                                      if r.metadata is not None})
        return self._insert(project, requests, info, endpoint, priority=rank)

    def _check_count(self, count: int, where: str) -> None:
        if count == 0:
            raise InvalidRequest(f"Invalid value at '{where}': a batch needs at least one "
                                 f"request.", param=where)
        if count > self.max_requests:
            raise InvalidRequest(f"Invalid value at '{where}': a batch may hold at most "
                                 f"{self.max_requests} requests.", param=where)

    def _inline(self, inline: Any, model: str, translate: Translate) -> list[_Request]:
        where = "batch.input_config.requests.requests"
        items = inline.get("requests") if isinstance(inline, dict) else inline
        if not isinstance(items, list):
            raise _bad(where, "a list of inlined requests")
        self._check_count(len(items), where)
        requests = []
        for i, item in enumerate(items):
            item = _object(item, f"{where}[{i}]")
            metadata = item.get("metadata")
            if metadata is not None and not isinstance(metadata, dict):
                raise _bad(f"{where}[{i}].metadata", "an object")
            requests.append(_Request(None, translate(item.get("request"), model,
                                                     f"{where}[{i}].request"), metadata))
        return requests

    def _from_file(self, project: str, file_name: Any, model: str,
                   translate: Translate) -> list[_Request]:
        where = "batch.input_config.file_name"
        if not isinstance(file_name, str) or not file_name.startswith("files/"):
            raise _bad(where, "a file name such as 'files/abc'")
        record = self.store.get_file(project, file_name.removeprefix("files/"))
        now = int(self.clock())
        if record is None or record.purpose.startswith(INTERNAL_PURPOSE_PREFIX) or (
                record.expires_at is not None and record.expires_at <= now):
            raise NotFound(f"File '{file_name}' was not found.", param=where)
        requests = []
        with self.files.open_read(record.storage_key) as stream:
            for n, raw in enumerate(stream, start=1):
                if raw.strip():
                    requests.append(_file_line(raw, n, file_name, model, translate))
                    if len(requests) > self.max_requests:
                        break  # refused just below, without reading the rest
        self._check_count(len(requests), where)
        return requests

    def _insert(self, project: str, requests: list[_Request], info: Info,
                endpoint: str, *, priority: int = DEFAULT_PRIORITY) -> Batch:
        now = int(self.clock())
        file_id = ids.file_id()
        key = f"files/{file_id}"
        with self.files.open_write(key) as out:
            for i, request in enumerate(requests):
                out.write(orjson.dumps({"custom_id": custom_id(i, request.key),
                                        "method": "POST", "url": endpoint,
                                        "body": request.body}) + b"\n")
        self.store.insert_file(FileRecord(
            id=file_id, project=project, filename="gemini_batch_requests.jsonl",
            purpose=INPUT_PURPOSE, bytes=self.files.size(key), created_at=now,
            expires_at=None, storage_key=key))
        batch = Batch(id=batch_id(), project=project, endpoint=endpoint,
                      input_file_id=file_id, completion_window="24h",
                      status=BatchStatus.VALIDATING, created_at=now,
                      expires_at=now + self.window_s, total=len(requests),
                      chunk_size=self.chunk_size, max_tasks=self.max_requests,
                      metadata=info.to_metadata(), priority=priority)
        self.store.insert_batch(batch)
        return batch

    # -- read, list, cancel, delete ----------------------------------------------------

    def get(self, project: str, batch_id: str) -> Batch:
        batch = self.store.get_batch(project, batch_id) \
            if batch_id.startswith(GEMINI_ID_PREFIX) else None
        if batch is None:
            raise NotFound(f"Batch 'batches/{batch_id}' was not found.", param="name")
        return batch

    def list(self, project: str, *, page_token: str | None, page_size: int) -> Page[Batch]:
        return self.store.list_batches(project, after=page_token or None, limit=page_size,
                                       id_prefix=GEMINI_ID_PREFIX)

    def cancel(self, project: str, batch_id: str) -> Batch:
        batch = self.get(project, batch_id)
        if batch.status.is_terminal:
            raise InvalidRequest(f"Batch 'batches/{batch_id}' has already ended "
                                 f"({state(batch)}) and can no longer be cancelled.",
                                 param="name", code="FAILED_PRECONDITION")
        return self.store.request_cancel(project, batch_id, int(self.clock()))

    def delete(self, project: str, batch_id: str) -> None:
        batch = self.get(project, batch_id)
        if not batch.status.is_terminal or not self.store.delete_batch(project, batch_id):
            raise InvalidRequest(f"Batch 'batches/{batch_id}' is still running: cancel it "
                                 f"and wait for it to end before deleting it.", param="name",
                                 code="FAILED_PRECONDITION")
        for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id,
                        results_file_id(batch)):
            self._drop_file(project, file_id)

    def _drop_file(self, project: str, file_id: str | None) -> None:
        record = self.store.delete_file(project, file_id) if file_id else None
        if record is not None and not self.store.blob_in_use(record.storage_key, record.id):
            self.files.delete(record.storage_key)

    # -- output ------------------------------------------------------------------------

    def output(self, batch: Batch) -> dict[str, Any] | None:
        """The batch's `GenerateContentBatchOutput`: the responses file of a file batch, or
        the inline batch's responses in order. None until it has ended with answers."""
        record = self.results(batch)
        if record is None:
            return None
        if Info.of(batch).source_file is not None:
            return {"responsesFile": f"files/{record.id}"}
        with self.files.open_read(record.storage_key) as stream:
            answers = [orjson.loads(raw) for raw in stream if raw.strip()]
        return {"inlinedResponses": {"inlinedResponses": answers}}

    def results(self, batch: Batch) -> FileRecord | None:
        """The batch's results file, written the first time it is asked for once the batch
        has ended; the engine's own output and error files then go."""
        found = self.store.get_file(batch.project, results_file_id(batch))
        if found is not None or batch.status not in _ANSWERED:
            return found
        try:
            record = self._write_results(batch)
        except FileNotFoundError:
            # Another request wrote it first and removed the engine's files meanwhile.
            return self.store.get_file(batch.project, results_file_id(batch))
        try:
            self.store.insert_file(record)
        except IntegrityError:  # another request's copy is in: keep that one
            self.files.delete(record.storage_key)
            return self.store.get_file(batch.project, results_file_id(batch))
        for file_id in (batch.output_file_id, batch.error_file_id):
            self._drop_file(batch.project, file_id)
        return record

    def _write_results(self, batch: Batch) -> FileRecord:
        info = Info.of(batch)
        sources = [r.storage_key for f in (batch.output_file_id, batch.error_file_id)
                   if f and (r := self.store.get_file(batch.project, f)) is not None]
        key = f"files/{ids.file_id()}"
        try:
            with self.files.open_write(key) as out:
                for line in _result_lines(batch, info, ordered_answers(self.files, sources)):
                    out.write(line)
        except BaseException:
            self.files.delete(key)
            raise
        inline = info.source_file is None
        return FileRecord(
            id=results_file_id(batch), project=batch.project,
            filename=f"batch-{batch.id}-results.jsonl",
            purpose=INLINE_RESULTS_PURPOSE if inline else Purpose.BATCH_OUTPUT.value,
            bytes=self.files.size(key), created_at=int(self.clock()), expires_at=None,
            storage_key=key)


def _file_line(raw: bytes, n: int, file_name: str, model: str,
               translate: Translate) -> _Request:
    where = f"{file_name} line {n}"
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(f"Invalid JSON at {where}: each line must be an object with "
                             f"'key' and 'request'.", param="batch.input_config.file_name"
                             ) from None
    if not isinstance(line, dict):
        raise _bad(where, "an object with 'key' and 'request'")
    key = line.get("key")
    if key is not None and not isinstance(key, str):
        raise _bad(f"{where}.key", "a string")
    return _Request(key, translate(line.get("request"), model, f"{where}.request"))


def _unrun(batch: Batch) -> dict[str, Any]:
    if batch.status is BatchStatus.EXPIRED:
        return _rpc_status("DEADLINE_EXCEEDED", "The request could not be run before the "
                                                "batch expired.")
    if batch.status is BatchStatus.CANCELLED:
        return _rpc_status("CANCELLED", "The request was not run: the batch was cancelled.")
    return _rpc_status("INTERNAL", "The request has no answer.")


def _result_lines(batch: Batch, info: Info, answers: Iterator[tuple[int, bytes]]
                  ) -> Iterator[bytes]:
    """One line per request, in order: keyed results for a file batch, `InlinedResponse`s
    for inline requests. A request without an answer (cancelled before it was read) gets
    the reason it has none."""
    keys: dict[int, str | None] = {}
    results: Iterator[tuple[int, dict[str, Any]]] = (
        (index, _keep_key(keys, index, orjson.loads(raw), info.model, batch.endpoint))
        for index, raw in answers)
    for index, result in _filled(results, info.requests, lambda: {"error": _unrun(batch)}):
        if info.source_file is not None:
            key = keys.pop(index, None)
            line = ({"key": key} if key is not None else {}) | result
        else:
            line = result | ({"metadata": info.request_metadata[index]}
                             if index in info.request_metadata else {})
        yield orjson.dumps(line) + b"\n"


def _keep_key(keys: dict[int, str | None], index: int, line: dict[str, Any],
              model: str, endpoint: str) -> dict[str, Any]:
    keys[index] = parse_custom_id(line["custom_id"])[1]
    return result_of(line, model.removeprefix("models/"), endpoint)


def _filled(results: Iterator[tuple[int, dict[str, Any]]], total: int,
            missing: Callable[[], dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every index from 0 to `total - 1` once: the results given, `missing()` for gaps."""
    expected = 0
    for index, result in results:
        if index < expected:
            continue  # a request answered twice keeps its first answer
        while expected < index:
            yield expected, missing()
            expected += 1
        yield index, result
        expected = index + 1
    while expected < total:
        yield expected, missing()
        expected += 1


# -- files ------------------------------------------------------------------------------

def mime_type(filename: str) -> str:
    if filename.endswith(".jsonl"):
        return "application/jsonl"
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def file_object(record: FileRecord, api_root: str) -> dict[str, Any]:
    """A `File` of the Gemini Files API. `api_root` is the versioned base URL."""
    generated = record.purpose == Purpose.BATCH_OUTPUT.value
    obj: dict[str, Any] = {
        "name": f"files/{record.id}", "displayName": record.filename,
        "mimeType": mime_type(record.filename), "sizeBytes": str(record.bytes),
        "createTime": rfc3339(record.created_at), "updateTime": rfc3339(record.created_at),
        "uri": f"{api_root}/files/{record.id}", "state": "ACTIVE",
        "source": "GENERATED" if generated else "UPLOADED"}
    if record.expires_at is not None:
        obj["expirationTime"] = rfc3339(record.expires_at)
    if generated:
        obj["downloadUri"] = f"{api_root}/files/{record.id}:download?alt=media"
    return obj


# -- resumable uploads --------------------------------------------------------------------

@dataclass(kw_only=True)
class Upload:
    """A resumable upload in progress; kept in the file store beside its parts, so that any
    server process can take the next chunk."""

    project: str
    filename: str
    size: int
    received: int = 0
    parts: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps({"project": self.project, "filename": self.filename,
                             "size": self.size, "received": self.received,
                             "parts": self.parts})


#: What `secrets.token_urlsafe(32)` makes; nothing else names an upload's blobs.
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{43}")


class UploadSessions:
    """The Files API's resumable protocol: `start` gives an upload id (the capability the
    chunks carry instead of an API key), chunks are appended at their offset, and the last
    one makes the file."""

    def __init__(self, files: FileStore) -> None:
        self.files = files

    @staticmethod
    def _prefix(upload_id: str) -> str:
        return f"uploads/{upload_id}"

    def start(self, project: str, filename: str, size: int) -> str:
        upload_id = secrets.token_urlsafe(32)
        self._save(upload_id, Upload(project=project, filename=filename, size=size))
        return upload_id

    def _save(self, upload_id: str, upload: Upload) -> None:
        with self.files.open_write(f"{self._prefix(upload_id)}/meta.json") as out:
            out.write(upload.to_json())

    def get(self, upload_id: str) -> Upload:
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise NotFound("No such upload.", param="upload_id")
        try:
            with self.files.open_read(f"{self._prefix(upload_id)}/meta.json") as stream:
                return Upload(**orjson.loads(stream.read()))
        except FileNotFoundError:
            raise NotFound("No such upload: it finished, or never started.",
                           param="upload_id") from None

    def append(self, upload_id: str, upload: Upload, chunks: Iterable[bytes]) -> Upload:
        """Store the next chunk; it may not take the upload past its announced size."""
        key = f"{self._prefix(upload_id)}/{upload.parts:08d}"
        written = 0
        try:
            with self.files.open_write(key) as out:
                for block in chunks:
                    written += len(block)
                    if upload.received + written > upload.size:
                        raise InvalidRequest(f"The upload is longer than the "
                                             f"{upload.size} bytes announced at its start.",
                                             param="X-Goog-Upload-Offset")
                    out.write(block)
        except BaseException:
            self.files.delete(key)
            raise
        upload.received += written
        upload.parts += 1
        self._save(upload_id, upload)
        return upload

    @contextlib.contextmanager
    def content(self, upload_id: str, upload: Upload) -> Iterator[IO[bytes]]:
        """The whole upload as one stream; the upload is gone once it is closed."""
        keys = [f"{self._prefix(upload_id)}/{n:08d}" for n in range(upload.parts)]
        try:
            yield io.BufferedReader(_Concat(self.files, keys), buffer_size=1 << 20)
        finally:
            self.files.delete_prefix(self._prefix(upload_id))


class _Concat(io.RawIOBase):
    """Blobs read one after the other, as one stream."""

    def __init__(self, files: FileStore, keys: list[str]) -> None:
        self.files = files
        self.keys = list(keys)
        self.current: IO[bytes] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self.current is None:
                if not self.keys:
                    return 0
                self.current = self.files.open_read(self.keys.pop(0))
            data = self.current.read(len(buffer))
            if data:
                buffer[:len(data)] = data
                return len(data)
            self.current.close()
            self.current = None

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
        super().close()

"""`gemini_batch`: hand a whole batch to a Gemini-compatible Batch Mode API (Google's Gemini
Developer API, or another Batchery), and bring its results back.

Gemini speaks GenerateContent, not chat: each chat completion request (or Anthropic Messages
request, through its chat form) is translated into a `GenerateContentRequest` on the way
out, and each `GenerateContentResponse` back into a chat completion (or a Message) on the
way in. Small batches go inline in the create call; larger ones are uploaded as a JSONL
file through the provider's resumable upload protocol.

A request whose body has the wrong shape (checked as for every backend), or that Gemini
cannot express, is not sent: it gets its 400 line when the batch ends, and the others run.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from batchery.backends import remote_common
from batchery.backends.remote_common import call, checked
from batchery.model.batches import Batch, BatchError, canonical_endpoint
from batchery.model.exceptions import BackendError
from batchery.ports.backend import Reply, error_reply
from batchery.ports.remote import Progress, RemoteBatchBackend
from batchery.wire import anthropic, openai_lines, request_schemas
from batchery.wire.anthropic import CHAT_ENDPOINT, MESSAGES_ENDPOINT

API_VERSION = "v1beta"
#: Google caps an inline create call at 20 MB; above this many bytes of requests a file
#: is uploaded instead, leaving room for the envelope.
INLINE_MAX_BYTES = 10 * 1024 * 1024
#: Uploads go in chunks of this size, as the google-genai SDK sends them (a multiple of
#: the granularity Google's upload server asks for).
UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024
#: Our own state, kept in the provider's job object between steps (the batch's endpoint:
#: the results are rendered for it).
STATE_KEY = "batchery"

_ENDED = {"SUCCEEDED", "CANCELLED", "EXPIRED", "FAILED"}
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                   "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                   "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
                   "IMAGE_SAFETY": "content_filter"}
#: google.rpc.Code -> HTTP status, for per-request errors that carry a gRPC code.
_GRPC_STATUS = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400,
                10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}
_CANCELLED_STATUS, _DEADLINE_STATUS = 499, 504
_GRPC_NAMES = {"CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
               "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7,
               "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10,
               "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
               "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
#: Chat parameters that do not change what the model answers: dropped.
_IGNORED = {"model", "messages", "user", "metadata", "store", "service_tier", "stream",
            "stream_options", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
_CONFIG_KEYS = {"temperature": "temperature", "top_p": "topP", "top_k": "topK",
                "n": "candidateCount", "seed": "seed", "presence_penalty": "presencePenalty",
                "frequency_penalty": "frequencyPenalty"}
_HANDLED = _IGNORED | set(_CONFIG_KEYS) | {"max_tokens", "max_completion_tokens", "stop",
                                           "response_format", "reasoning_effort", "tools",
                                           "tool_choice", "logprobs"}
_TOOL_MODES = {"none": "NONE", "auto": "AUTO", "required": "ANY"}


class Unsupported(ValueError):
    """A chat request that GenerateContent cannot express: a 400 naming the field, in the
    hosted API's words."""

    def __init__(self, param: str, message: str, code: str = "unsupported_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def reply(self) -> Reply:
        return error_reply(400, str(self), param=self.param, code=self.code)


def _refused(param: str, what: str) -> Unsupported:
    return Unsupported(param, f"Unsupported value: '{param}' {what}, which cannot be sent to "
                              f"a Gemini batch API.")


def _invalid(param: str, what: str) -> Unsupported:
    return Unsupported(param, f"Invalid value for '{param}': {what}.", "invalid_value")


# -- chat -> GenerateContent ----------------------------------------------------------------

def generate_content_request(body: dict[str, Any]) -> dict[str, Any]:
    """A chat completion body -> a `GenerateContentRequest` (REST JSON, camelCase)."""
    unknown = sorted(k for k in body if k not in _HANDLED)
    if unknown:
        raise Unsupported(unknown[0], f"Unsupported parameter: '{unknown[0]}' cannot be sent "
                                      f"to a Gemini batch API.", "unsupported_parameter")
    if body.get("stream"):
        raise _refused("stream", "asks for streaming")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _invalid("messages", "expected an array of messages")
    system, contents = _contents(messages)
    request: dict[str, Any] = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    config = _generation_config(body)
    if config:
        request["generationConfig"] = config
    if body.get("tools"):
        request["tools"] = [{"functionDeclarations": _functions(body["tools"])}]
    if body.get("tool_choice") is not None:
        request["toolConfig"] = {"functionCallingConfig": _tool_choice(body["tool_choice"])}
    return request


def _contents(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The system instruction's parts and the conversation's contents."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, for the tool messages
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, "expected an object")
        role = message.get("role")
        if role in ("system", "developer"):
            # Gemini has one system instruction: every system message goes there, in order.
            system += _parts(message.get("content"), f"{where}.content")
        elif role == "user":
            contents.append({"role": "user",
                             "parts": _parts(message.get("content"), f"{where}.content")})
        elif role == "assistant":
            contents.append({"role": "model", "parts": _model_parts(message, where, names)})
        elif role == "tool":
            contents.append({"role": "user", "parts": [_tool_result(message, where, names)]})
        else:
            raise _refused(f"{where}.role", f"is {orjson.dumps(role).decode()}")
    return system, contents


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise _invalid(where, "expected a string or an array of content parts")
    return [_part(part, f"{where}[{i}]") for i, part in enumerate(content)]


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("text", "refusal"):
        return {"text": str(part.get(kind) or "")}
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url")
        return _media(url, f"{where}.image_url.url")
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        return {"inlineData": {"mimeType": f"audio/{audio.get('format')}",
                               "data": audio.get("data")}}
    if kind == "file" and isinstance((part.get("file") or {}).get("file_data"), str):
        return _media(part["file"]["file_data"], f"{where}.file.file_data")
    what = "a 'file' part given by file_id" if kind == "file" else \
        f"a content part of type {orjson.dumps(kind).decode()}"
    raise _refused(where, f"is {what}")


def _media(url: Any, where: str) -> dict[str, Any]:
    """A data URL becomes inline bytes; any other URL a file reference."""
    if not isinstance(url, str):
        raise _invalid(where, "expected a URL")
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        if not sep or not head.endswith(";base64"):
            raise _refused(where, "is a data URL that is not base64")
        return {"inlineData": {"mimeType": head.removesuffix(";base64"), "data": data}}
    return {"fileData": {"fileUri": url}}


def _model_parts(message: dict[str, Any], where: str,
                 names: dict[str, str]) -> list[dict[str, Any]]:
    parts = _parts(message.get("content"), f"{where}.content")
    for j, call_ in enumerate(message.get("tool_calls") or []):
        function = call_.get("function") if isinstance(call_, dict) else None
        if not isinstance(function, dict):
            raise _refused(f"{where}.tool_calls[{j}]", "is not a function call")
        try:
            args = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            raise _invalid(f"{where}.tool_calls[{j}].function.arguments",
                           "expected a JSON object")
        names[str(call_.get("id"))] = str(function.get("name"))
        parts.append({"functionCall": {"name": function.get("name"), "args": args}})
    return parts


def _tool_result(message: dict[str, Any], where: str, names: dict[str, str]) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    name = names.get(str(call_id))
    if name is None:
        raise _invalid(f"{where}.tool_call_id", f"no earlier assistant message made the call "
                                                f"{orjson.dumps(call_id).decode()}")
    text = "".join(p.get("text", "") for p in _parts(message.get("content"), f"{where}.content"))
    try:
        result = orjson.loads(text)
    except orjson.JSONDecodeError:
        result = None
    return {"functionResponse": {"name": name, "response": result if isinstance(result, dict)
                                 else {"content": text}}}


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config = {gemini: body[key] for key, gemini in _CONFIG_KEYS.items()
              if body.get(key) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        config["maxOutputTokens"] = limit
    if body.get("stop") is not None:
        stop = body["stop"]
        config["stopSequences"] = [stop] if isinstance(stop, str) else stop
    if body.get("logprobs"):
        raise _refused("logprobs", "asks for log probabilities")
    config |= _response_format(body.get("response_format"))
    effort = body.get("reasoning_effort")
    if effort is not None:
        config["thinkingConfig"] = ({"thinkingBudget": 0} if effort == "none"
                                    else {"thinkingLevel": str(effort).upper()})
    return config


def _response_format(fmt: Any) -> dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return {}
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        return {"responseMimeType": "application/json",
                "responseJsonSchema": fmt["json_schema"].get("schema") or {}}
    raise _refused("response_format.type", f"is {orjson.dumps(kind).decode()}")


def _functions(tools: Any) -> list[dict[str, Any]]:
    declarations = []
    for i, tool in enumerate(tools if isinstance(tools, list) else [None]):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _refused(f"tools[{i}]", f"is a tool of type {orjson.dumps(kind).decode()}")
        declaration = {"name": function.get("name")}
        if function.get("description"):
            declaration["description"] = function["description"]
        if function.get("parameters") is not None:
            declaration["parametersJsonSchema"] = function["parameters"]
        declarations.append(declaration)
    return declarations


def _tool_choice(choice: Any) -> dict[str, Any]:
    if isinstance(choice, str) and choice in _TOOL_MODES:
        return {"mode": _TOOL_MODES[choice]}
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise _invalid("tool_choice", "expected 'none', 'auto', 'required' or a function")
    return {"mode": "ANY", "allowedFunctionNames": [name]}


# -- GenerateContent -> chat ----------------------------------------------------------------

def chat_completion(response: dict[str, Any], model: str) -> dict[str, Any]:
    """A `GenerateContentResponse` -> a chat completion body."""
    candidates = response.get("candidates") or []
    choices = [_choice(c, i) for i, c in enumerate(candidates)]
    if not choices:  # the prompt itself was blocked
        reason = (response.get("promptFeedback") or {}).get("blockReason") or "OTHER"
        choices = [{"index": 0, "finish_reason": "content_filter", "logprobs": None,
                    "message": {"role": "assistant", "content": None,
                                "refusal": f"The provider blocked the prompt ({reason})."}}]
    response_id = response.get("responseId") or secrets.token_hex(12)
    return {"id": f"chatcmpl-{response_id}", "object": "chat.completion",
            "created": int(time.time()),
            "model": response.get("modelVersion") or model.removeprefix("models/"),
            "choices": choices, "usage": _usage(response.get("usageMetadata") or {})}


def _choice(candidate: dict[str, Any], i: int) -> dict[str, Any]:
    parts = (candidate.get("content") or {}).get("parts") or []
    # Thought summaries are not part of the answer.
    texts = [p["text"] for p in parts if isinstance(p.get("text"), str) and not p.get("thought")]
    calls = [_tool_call(p["functionCall"]) for p in parts if isinstance(p.get("functionCall"),
                                                                          dict)]
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(texts) if texts or not calls else None,
                               "refusal": None}
    reason = _FINISH_REASONS.get(str(candidate.get("finishReason")), "stop")
    if calls:
        message["tool_calls"] = calls
        reason = "tool_calls" if reason == "stop" else reason
    return {"index": int(candidate.get("index") or i), "message": message,
            "finish_reason": reason, "logprobs": None}


def _tool_call(call_: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_.get("id") or f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": call_.get("name"),
                         "arguments": orjson.dumps(call_.get("args") or {}).decode()}}


def _usage(meta: dict[str, Any]) -> dict[str, Any]:
    prompt = _int(meta.get("promptTokenCount"))
    thoughts = _int(meta.get("thoughtsTokenCount"))
    completion = _int(meta.get("candidatesTokenCount")) + thoughts
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": _int(meta.get("totalTokenCount")) or prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": thoughts}}


def _int(value: Any) -> int:
    """An int64 field: proto3's JSON writes them as strings."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def error_status(error: dict[str, Any]) -> int:
    """The HTTP status of a per-request error: a `google.rpc.Status` carries a gRPC code,
    Google's error envelope an HTTP one and the status name."""
    code = _GRPC_NAMES.get(str(error.get("status")), _int(error.get("code")))
    if code >= 100:
        return code
    return _GRPC_STATUS.get(code, 500)


# -- the connector ----------------------------------------------------------------------------

class GeminiBatchBackend(RemoteBatchBackend):
    endpoints = frozenset({CHAT_ENDPOINT, MESSAGES_ENDPOINT})

    def __init__(self, *, base_url: str, api_key_env: str | None = None,
                 api_key: str | None = None, model: str | None = None,
                 api_version: str = API_VERSION, inline_max_bytes: int = INLINE_MAX_BYTES,
                 timeout_s: float = 120.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if inline_max_bytes < 0:
            raise ValueError("inline_max_bytes must be 0 or more")
        key = remote_common.api_key(api_key_env, api_key)
        headers = {"x-goog-api-key": key} if key else {}
        self.model = model
        self.version = api_version.strip("/")
        self.inline_max_bytes = inline_max_bytes
        self._base = base_url.rstrip("/") + "/"
        self._client = httpx.Client(base_url=self._base, headers=headers, timeout=timeout_s,
                                    transport=transport)

    # -- submit --

    def submit(self, batch: Batch, lines: Iterator[bytes]) -> dict[str, Any]:
        endpoint = canonical_endpoint(batch.endpoint)
        with tempfile.TemporaryFile() as requests:
            model, size = _write_requests(endpoint, lines, requests)
            if size == 0:
                # Every request was refused: no provider batch, and each request gets its
                # 400 when the batch ends (`rejected_line`).
                return {"done": True, STATE_KEY: {"endpoint": endpoint}}
            requests.seek(0)
            if size <= self.inline_max_bytes:
                source: dict[str, Any] = {"requests": {"requests": [
                    _inline(orjson.loads(raw)) for raw in requests]}}
            else:
                source = {"fileName": self._upload(batch, requests, size)}
        model = self.model or model
        path = model if model.startswith("models/") else f"models/{model}"
        job = call(self._client, "POST", f"{self.version}/{path}:batchGenerateContent", json={
            "batch": {"displayName": f"batchery {batch.id}", "inputConfig": source}})
        return _ours(job, {"endpoint": endpoint})

    def rejected_line(self, raw: bytes) -> bytes | None:
        line = orjson.loads(raw)
        endpoint = canonical_endpoint(str(line.get("url")))
        request = _request_of(endpoint, line["body"])
        if not isinstance(request, Reply):
            return None
        return _render(endpoint == MESSAGES_ENDPOINT, line["custom_id"], request,
                       line["body"].get("model"))

    def _upload(self, batch: Batch, stream: IO[bytes], size: int) -> str:
        """Upload the requests file by the resumable protocol; returns its name."""
        url = f"upload/{self.version}/files"
        start = self._post(url, json={"file": {"displayName": f"batchery {batch.id} requests"}},
                           headers={"X-Goog-Upload-Protocol": "resumable",
                                    "X-Goog-Upload-Command": "start",
                                    "X-Goog-Upload-Header-Content-Length": str(size),
                                    "X-Goog-Upload-Header-Content-Type": "application/jsonl"})
        if not start.is_success:
            checked(start)  # raises, with the provider's answer
        target = start.headers.get("x-goog-upload-url")
        if not target:
            raise BackendError(f"POST {url}: the provider gave no upload URL")
        done = self._send(self._same_host(target), stream, size)
        name = (done.get("file") or {}).get("name") if isinstance(done, dict) else None
        if not isinstance(name, str):
            raise BackendError(f"POST {url}: the provider's answer names no file")
        return name

    def _send(self, url: str, stream: IO[bytes], size: int) -> Any:
        """Send the bytes in chunks, the last one finalizing; returns the final answer."""
        offset = 0
        while True:
            chunk = stream.read(UPLOAD_CHUNK_BYTES)
            last = not chunk or offset + len(chunk) >= size
            response = self._post(url, content=chunk, headers={
                "X-Goog-Upload-Command": "upload, finalize" if last else "upload",
                "X-Goog-Upload-Offset": str(offset)})
            offset += len(chunk)
            if last or not response.is_success:
                return checked(response)
            if response.headers.get("x-goog-upload-status") != "active":
                raise BackendError(f"uploading the requests: the provider ended the upload "
                                   f"after {offset} of {size} bytes")

    def _post(self, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.post(url, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"POST {urlsplit(url).path}: {type(exc).__name__}: "
                               f"{exc}") from exc

    def _same_host(self, url: str) -> str:
        """The upload URL on the configured host, as the google-genai SDK does: the key goes
        nowhere else, whatever URL the provider names."""
        ours, theirs = urlsplit(self._base), urlsplit(url)
        return urlunsplit(theirs._replace(scheme=ours.scheme, netloc=ours.netloc))

    # -- poll, cancel --

    def refresh(self, job: dict[str, Any]) -> dict[str, Any]:
        if "name" not in job:
            return job  # nothing was sent
        fresh = call(self._client, "GET", f"{self.version}/{job['name']}")
        return _ours(fresh, job.get(STATE_KEY) or {})

    def cancel(self, job: dict[str, Any]) -> dict[str, Any]:
        if "name" not in job:
            return job
        # The provider may refuse because the batch has just ended: its state is what counts.
        with contextlib.suppress(BackendError):
            call(self._client, "POST", f"{self.version}/{job['name']}:cancel", json={})
        return self.refresh(job)

    def progress(self, job: dict[str, Any]) -> Progress:
        meta = job.get("metadata") or {}
        state = _state(meta.get("state"))
        if state == "FAILED" or (job.get("done") and job.get("error")):
            error = job.get("error") or meta.get("error") or {}
            return Progress(ended=True, errors=[BatchError(
                code="remote_failed",
                message=str(error.get("message") or "The provider failed the batch."))])
        stats = meta.get("batchStats") or {}
        return Progress(ended=state in _ENDED or bool(job.get("done")),
                        completed=_int(stats.get("successfulRequestCount")),
                        failed=_int(stats.get("failedRequestCount")))

    # -- results --

    def fetch(self, job: dict[str, Any], out: IO[bytes], err: IO[bytes]) -> None:
        meta = job.get("metadata") or {}
        writer = _Writer(endpoint=(job.get(STATE_KEY) or {}).get("endpoint", CHAT_ENDPOINT),
                         model=str(meta.get("model") or ""),
                         expired=_state(meta.get("state")) == "EXPIRED", out=out, err=err)
        if "name" not in job:
            return  # nothing was sent
        output = _output(job)
        if isinstance(output.get("responsesFile"), str):
            self._download(output["responsesFile"], writer)
            return
        # The job kept between steps leaves the inline responses out: fetch them now.
        full = call(self._client, "GET", f"{self.version}/{job['name']}")
        for item in _inlined(_output(full)):
            writer.write(item.get("metadata") or {}, item)

    def _download(self, name: str, writer: _Writer) -> None:
        url = f"{self.version}/files/{name.removeprefix('files/')}:download"
        try:
            with self._client.stream("GET", url, params={"alt": "media"}) as response:
                if not response.is_success:
                    response.read()
                    raise BackendError(f"downloading {name}: the provider answered "
                                       f"{response.status_code}: {response.text[:500]}")
                for raw in response.iter_lines():
                    if raw.strip():
                        line = orjson.loads(raw)
                        writer.write(line, line)
        except httpx.HTTPError as exc:
            raise BackendError(f"downloading {name}: {type(exc).__name__}: {exc}") from exc
        except orjson.JSONDecodeError as exc:
            raise BackendError(f"downloading {name}: a line is not JSON: {exc}") from exc

    def close(self) -> None:
        self._client.close()


def _write_requests(endpoint: str, lines: Iterator[bytes], out: IO[bytes]) -> tuple[str, int]:
    """Write the batch's requests as Gemini JSONL lines, leaving out those it refuses;
    returns the lines' model and the bytes written."""
    model, size = "", 0
    for raw in lines:
        line = orjson.loads(raw)
        request = _request_of(endpoint, line["body"])
        if isinstance(request, Reply):
            continue
        model = model or str(line["body"].get("model") or "")
        size += out.write(orjson.dumps({"key": line["custom_id"], "request": request}) + b"\n")
    return model, size


def _request_of(endpoint: str, body: dict[str, Any]) -> dict[str, Any] | Reply:
    """The `GenerateContentRequest` of a line's body, or the 400 that answers it instead:
    its shape is wrong (checked as for every backend), or Gemini cannot express it."""
    chat = body
    if endpoint == MESSAGES_ENDPOINT:
        try:
            chat = anthropic.to_chat(body)
        except anthropic.ParamsError as exc:
            return error_reply(400, str(exc))
    problem = request_schemas.check(CHAT_ENDPOINT, chat)
    if problem is not None:
        return problem.reply()
    try:
        return generate_content_request(chat)
    except Unsupported as exc:
        return exc.reply()


def _render(messages: bool, custom_id: str, reply: Reply, model: str) -> bytes:
    """Our result line: an Anthropic result for message batches, else an OpenAI line."""
    if messages:
        return anthropic.result_line(custom_id, reply, reply.body.get("model") or model)
    return openai_lines.response_line(custom_id, reply)


def _inline(line: dict[str, Any]) -> dict[str, Any]:
    return {"request": line["request"], "metadata": {"key": line["key"]}}


def _ours(job: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The provider's job as kept between steps: without the inline responses (they can be
    large, and are fetched at the end), with our own state."""
    if not isinstance(job, dict) or not isinstance(job.get("name"), str):
        raise BackendError(f"the provider answered with no batch name: {str(job)[:500]}")
    slim = dict(job)
    meta = slim.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("output"), dict):
        slim["metadata"] = {**meta, "output": _without_inline(meta["output"])}
    if isinstance(slim.get("response"), dict):
        slim["response"] = _without_inline(slim["response"])
    slim[STATE_KEY] = state
    return slim


def _without_inline(output: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in output.items() if k != "inlinedResponses"}


def _output(job: dict[str, Any]) -> dict[str, Any]:
    """Where the results are: the batch's `output`, or the finished operation's `response`."""
    meta = job.get("metadata") or {}
    output = meta.get("output") or job.get("response") or {}
    return output if isinstance(output, dict) else {}


def _inlined(output: dict[str, Any]) -> list[dict[str, Any]]:
    inlined = output.get("inlinedResponses") or []
    if isinstance(inlined, dict):  # `{"inlinedResponses": {"inlinedResponses": [...]}}`
        inlined = inlined.get("inlinedResponses") or []
    return [item for item in inlined if isinstance(item, dict)]


def _error_of(result: dict[str, Any]) -> dict[str, Any] | None:
    """A result's error: `error`, or a `status` that is not OK (code 0)."""
    error = result.get("error") or result.get("status")
    if not isinstance(error, dict) or not (_int(error.get("code")) or error.get("message")):
        return None
    return error


def _error_reply(error: dict[str, Any]) -> Reply:
    status = error_status(error) if error else 502
    message = error.get("message") or "The provider returned neither a response nor an error."
    return error_reply(status, str(message),
                       type_="server_error" if status >= 500 else "invalid_request_error",
                       code=str(error["status"]) if error.get("status") else None)


def _state(state: Any) -> str:
    return str(state or "").removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_")


class _Writer:
    """Renders the provider's results as our result lines, each key once."""

    def __init__(self, *, endpoint: str, model: str, expired: bool, out: IO[bytes],
                 err: IO[bytes]) -> None:
        self.messages = endpoint == MESSAGES_ENDPOINT
        self.model = model
        #: The provider's batch expired: its requests that ran out of time were never run.
        self.expired = expired
        self.out, self.err = out, err
        self._seen: set[str] = set()

    def write(self, keyed: dict[str, Any], result: dict[str, Any]) -> None:
        key = keyed.get("key")
        if not isinstance(key, str) or key in self._seen:
            return  # without a key it is reported as unanswered; a repeat is dropped
        self._seen.add(key)
        error = _error_of(result)
        status = error_status(error) if error is not None else None
        if status == _CANCELLED_STATUS or (status == _DEADLINE_STATUS and self.expired):
            self._unrun(key, cancelled=status == _CANCELLED_STATUS)
        elif error is not None or not isinstance(result.get("response"), dict):
            self._reply(key, _error_reply(error or {}))
        else:
            self._reply(key, Reply(status_code=200,
                                   body=chat_completion(result["response"], self.model)))

    def _reply(self, key: str, reply: Reply) -> None:
        line = _render(self.messages, key, reply, self.model.removeprefix("models/"))
        (self.out if reply.ok or self.messages else self.err).write(line)

    def _unrun(self, key: str, *, cancelled: bool) -> None:
        if self.messages:
            self.out.write(anthropic.unrun_line(key, "canceled" if cancelled else "expired"))
        elif cancelled:
            self.err.write(openai_lines.error_line(key, "batch_cancelled", "This request was not "
                                                "executed because the batch was cancelled."))
        else:
            self.err.write(openai_lines.error_line(key, "batch_expired", "This request could not "
                                                "be executed before the completion window "
                                                "expired."))

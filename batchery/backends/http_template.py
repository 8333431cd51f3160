"""`http`: a templated connector for any REST model (SageMaker, Cohere, TEI, TorchServe...).

A deployment describes the upstream's request as templates and its answer as a mapping:

    url: "http://127.0.0.1:9000/models/${model}/embed"
    method: POST
    headers: {Authorization: "Bearer ${credential.token}", X-Req: "${custom_id}"}
    body: {"inputs": "${body.input}", "truncate": true}
    response: {jsonpath: "$.embeddings"}        # or {post_process: "module:function"}
    credential: {token_env: MY_TOKEN}           # or {token: "..."}, sealed in the database
    upstream_model: "bge-small"                 # the value of ${model}; else body.model

Placeholders read `body` (the line's request body), `model`, `custom_id` and `credential`,
with paths such as `${body.messages[-1].content}`. A JSON string that is exactly one
placeholder becomes the value itself (a list stays a list); inside a longer string the
value's text is spliced in, percent-encoded in the URL. `$${...}` is a literal `${...}`.

The `jsonpath` mapping wraps what it finds into the OpenAI body of the line's endpoint;
`post_process(endpoint, request_body, response_json)` returns that body itself. Failures
are handled as in the `openai` connector: 429, 5xx, timeouts and dropped connections come
back retriable (with the upstream's `Retry-After`), other statuses keep the upstream's
status and body.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import orjson
from jsonpath_ng import JSONPath
from jsonpath_ng.exceptions import JSONPathError
from jsonpath_ng.ext.parser import parse as parse_jsonpath

from batchery.backends.openai_http import send, to_reply
from batchery.model.exceptions import ConfigError
from batchery.ports.backend import ModelBackend, Reply, Request, error_reply

#: `${path}`, or `$${path}` for a literal `${path}`.
_PLACEHOLDER = re.compile(r"\$(\$?)\{([^{}]*)\}")
#: `name(.name|[index])*`, e.g. `body.messages[-1].content` or `body.input.0`.
_PATH = re.compile(r"[^.\[\]\s]+(?:\.[^.\[\]\s]+|\[-?\d+\])*")
_SEGMENT = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Characters no header value may carry (tab is allowed).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ROOTS = ("body", "model", "custom_id", "credential")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
#: Methods that send the line's body when the deployment gives no body template.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_EXCERPT = 300

PostProcess = Callable[[str, dict[str, Any], Any], Any]
#: What one request sends: URL, headers, body.
_Prepared = tuple[str, dict[bytes, bytes], bytes | None]


class _Missing(Exception):
    """A placeholder names a path that this line's context does not have."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class HttpBackend(ModelBackend):
    endpoints = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

    def __init__(self, *, url: str, method: str = "POST",
                 headers: dict[str, str] | None = None, body: Any = None,
                 response: dict[str, str] | None = None,
                 credential: dict[str, str] | None = None, upstream_model: str | None = None,
                 max_concurrency: int = 64, timeout_s: float = 120.0) -> None:
        self.method = method.upper()
        if self.method not in _METHODS:
            raise ConfigError(f"method: expected one of {', '.join(sorted(_METHODS))}, "
                              f"not {method!r}")
        self.url = _check_url(url)
        self.headers = _check_headers(headers or {})
        # No template: send the line's own body, as the upstream may speak OpenAI already.
        self.body = body if body is not None else (
            "${body}" if self.method in _BODY_METHODS else None)
        self.upstream_model = upstream_model
        self.credential = _resolve_credential(credential or {})
        self.timeout_s = timeout_s
        self._jsonpath, self._post_process = _response_mapping(response or {})
        self._jsonpath_text = (response or {}).get("jsonpath")
        self._post_process_name = (response or {}).get("post_process")
        for where, template in (("url", url), ("headers", self.headers), ("body", self.body)):
            _check_template(template, where, self.credential)
        self._limit = asyncio.Semaphore(max(1, max_concurrency))
        self._max_concurrency = max(1, max_concurrency)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=self._max_concurrency,
                              max_keepalive_connections=self._max_concurrency)
        timeout = httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        if self._jsonpath is not None and endpoint not in _WRAPPERS:
            # A jsonpath value can only be wrapped into the bodies we know how to build.
            reply = error_reply(404, f"This http deployment cannot answer {endpoint}: its "
                                     "jsonpath mapping builds chat, completion and "
                                     "embedding bodies only.")
            return [reply] * len(requests)
        if self._client is None:
            await self.start()
        return list(await asyncio.gather(*(self._one(endpoint, r) for r in requests)))

    # -- one request -------------------------------------------------------------------

    def _context(self, request: Request) -> dict[str, Any]:
        model = self.upstream_model if self.upstream_model is not None \
            else request.body.get("model")
        return {"body": request.body, "model": model, "custom_id": request.custom_id,
                "credential": self.credential}

    async def _one(self, endpoint: str, request: Request) -> Reply:
        context = self._context(request)
        built = self._build(context)
        if isinstance(built, Reply):
            return built
        url, headers, content = built
        async with self._limit:
            response = await self._send(url, headers, content)
        if isinstance(response, Reply):
            return response
        if not response.is_success:
            return to_reply(response)  # status and body kept; 429/5xx retriable
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return to_reply(response)  # a 2xx that is not JSON: a 502 quoting the text
        return self._map(endpoint, request.body, context["model"], data)

    def _build(self, context: dict[str, Any]) -> _Prepared | Reply:
        try:
            url = _render_text(self.url, context, _percent_encode)
            headers = {name: _render_text(value, context)
                       for name, value in self.headers.items()}
            body = None if self.body is None else _render_json(self.body, context)
        except _Missing as exc:
            return error_reply(400, f"This deployment's request template needs "
                                    f"'{exc.path}', which the request does not have.",
                               param=exc.path.removeprefix("body."),
                               code="missing_required_parameter")
        for name, value in headers.items():
            # A line break from the request would smuggle headers in; refuse the line.
            if _CONTROL.search(value):
                return error_reply(400, f"The request puts a control character in the "
                                        f"'{name}' header of this deployment's template.")
        if body is not None and not any(n.lower() == "content-type" for n in headers):
            headers["Content-Type"] = "application/json"
        # UTF-8 bytes: httpx would refuse a non-ASCII value (a custom_id such as "café").
        encoded = {name.encode(): value.encode() for name, value in headers.items()}
        return url, encoded, None if body is None else orjson.dumps(body)

    async def _send(self, url: str, headers: dict[bytes, bytes],
                    content: bytes | None) -> httpx.Response | Reply:
        assert self._client is not None
        try:
            return await send(self._client, self.method, url, timeout_s=self.timeout_s,
                              headers=headers, content=content)
        except httpx.InvalidURL as exc:
            return error_reply(400, f"The URL this deployment built for the request is not "
                                    f"valid: {exc}")

    # -- the answer --------------------------------------------------------------------

    def _map(self, endpoint: str, body: dict[str, Any], model: Any, data: Any) -> Reply:
        if self._post_process is not None:
            return self._run_post_process(endpoint, body, data)
        if self._jsonpath is None:
            if isinstance(data, dict):
                return Reply(status_code=200, body=data)
            return _unmapped(f"The upstream answered with {_excerpt(data)}, not a JSON "
                             "object, and this deployment has no response mapping.")
        matches = [m.value for m in self._jsonpath.find(data)]
        if not matches:
            return _unmapped(f"The upstream's answer has nothing at jsonpath "
                             f"{self._jsonpath_text}: {_excerpt(data)}")
        # One match is the value itself; several (`$.data[*].embedding`) are a list.
        value = matches[0] if len(matches) == 1 else matches
        wrap, expected = _WRAPPERS[endpoint]
        wrapped = wrap(value, model)
        if wrapped is None:
            return _unmapped(f"The value at jsonpath {self._jsonpath_text} is not "
                             f"{expected}: {_excerpt(value)}")
        return Reply(status_code=200, body=wrapped)

    def _run_post_process(self, endpoint: str, body: dict[str, Any], data: Any) -> Reply:
        assert self._post_process is not None
        name = self._post_process_name
        try:
            result = self._post_process(endpoint, body, data)
            # Checked here: an unserialisable body would fail the whole chunk when rendered.
            orjson.dumps(result)
        except Exception as exc:
            return _unmapped(f"post_process {name} failed on the upstream's answer: "
                             f"{type(exc).__name__}: {exc}", code="post_process_failed")
        if not isinstance(result, dict):
            return _unmapped(f"post_process {name} returned {type(result).__name__}, "
                             "not a JSON object.", code="post_process_failed")
        return Reply(status_code=200, body=result)


def _unmapped(message: str, code: str = "unmapped_upstream_body") -> Reply:
    # Not retriable: the upstream answered, and would answer the same way again.
    return error_reply(502, message, type_="server_error", code=code)


def _excerpt(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


# -- OpenAI bodies from mapped values ----------------------------------------------------


def _is_vector(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in value)


def _embeddings(value: Any, model: Any) -> dict[str, Any] | None:
    vectors = [value] if _is_vector(value) else value
    if not isinstance(vectors, list) or not vectors or not all(map(_is_vector, vectors)):
        return None
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": v}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def _texts(value: Any) -> list[str] | None:
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
        return texts
    return None


def _usage() -> dict[str, int]:
    # The upstream's shape carries no token counts we could rely on.
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _chat(value: Any, model: Any) -> dict[str, Any] | None:
    texts = _texts(value)
    if texts is None:
        return None
    choices = [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                "logprobs": None, "finish_reason": "stop"} for i, t in enumerate(texts)]
    return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage()}


def _completion(value: Any, model: Any) -> dict[str, Any] | None:
    texts = _texts(value)
    if texts is None:
        return None
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": "stop"}
               for i, t in enumerate(texts)]
    return {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage()}


#: endpoint -> (wrapper, what the mapped value must be)
_WRAPPERS: dict[str, tuple[Callable[[Any, Any], dict[str, Any] | None], str]] = {
    "/v1/embeddings": (_embeddings, "a vector or a list of vectors of numbers"),
    "/v1/chat/completions": (_chat, "a string or a list of strings"),
    "/v1/completions": (_completion, "a string or a list of strings"),
}


# -- templates ---------------------------------------------------------------------------


def _segments(path: str) -> list[str]:
    return [name or index for name, index in _SEGMENT.findall(path)]


def _lookup(context: dict[str, Any], path: str) -> Any:
    value: Any = context
    for segment in _segments(path):
        if isinstance(value, dict) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and re.fullmatch(r"-?\d+", segment) \
                and -len(value) <= int(segment) < len(value):
            value = value[int(segment)]
        else:
            raise _Missing(path)
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _percent_encode(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _render_text(template: str, context: dict[str, Any],
                 encode: Callable[[str], str] = str) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return match.group(0)[1:]
        return encode(_text(_lookup(context, match.group(2))))

    return _PLACEHOLDER.sub(substitute, template)


def _render_json(template: Any, context: dict[str, Any]) -> Any:
    if isinstance(template, str):
        match = _PLACEHOLDER.fullmatch(template)
        if match is not None and not match.group(1):
            return _lookup(context, match.group(2))  # the value itself, of any type
        return _render_text(template, context)
    if isinstance(template, dict):
        return {key: _render_json(value, context) for key, value in template.items()}
    if isinstance(template, list):
        return [_render_json(value, context) for value in template]
    return template


def _strings(template: Any) -> Iterator[str]:
    if isinstance(template, str):
        yield template
    elif isinstance(template, dict):
        for value in template.values():
            yield from _strings(value)
    elif isinstance(template, list):
        for value in template:
            yield from _strings(value)


def _check_template(template: Any, where: str, credential: dict[str, str]) -> None:
    """Refuse, before any line runs, the placeholders that could never resolve."""
    for text in _strings(template):
        if "${" in _PLACEHOLDER.sub("", text):
            raise ConfigError(f"{where}: unclosed placeholder in {text!r}")
        for match in _PLACEHOLDER.finditer(text):
            if not match.group(1):
                _check_path(match.group(2), where, credential)


def _check_path(path: str, where: str, credential: dict[str, str]) -> None:
    if not _PATH.fullmatch(path):
        raise ConfigError(f"{where}: '${{{path}}}' is not a path such as body.input")
    root, *rest = _segments(path)
    if root not in _ROOTS:
        raise ConfigError(f"{where}: unknown placeholder '${{{path}}}' (it must start "
                          f"with one of: {', '.join(_ROOTS)})")
    if root in ("model", "custom_id") and rest:
        raise ConfigError(f"{where}: '${{{path}}}': {root} is a string, without fields")
    if root == "credential":
        try:
            _lookup({"credential": credential}, path)
        except _Missing:
            raise ConfigError(f"{where}: '${{{path}}}': the deployment's credential has "
                              f"no such field (it has: {', '.join(sorted(credential))})"
                              ) from None


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"url: expected an http:// or https:// URL, not {url!r}")
    try:
        # Placeholders stand for percent-encoded text, so any plain word will do here.
        parsed = httpx.URL(_PLACEHOLDER.sub("x", url))
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as exc:
        raise ConfigError(f"url: not a valid URL: {exc}") from exc
    if not parsed.host or (port is not None and not 0 < port < 65536):
        raise ConfigError(f"url: expected a host and a port from 1 to 65535 in {url!r}")
    return url


def _check_headers(headers: Any) -> dict[str, str]:
    if not isinstance(headers, dict):
        raise ConfigError("headers: expected a mapping of header names to strings")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"headers: {name!r} is not a valid header name")
        if not isinstance(value, str):
            raise ConfigError(f"headers.{name}: expected a string (quote it in YAML)")
    return dict(headers)


# -- options -------------------------------------------------------------------------------


def _resolve_credential(options: dict[str, Any]) -> dict[str, str]:
    """`<name>_env` reads an environment variable into `<name>`; other keys are literal
    (`token`, sealed in the database, arrives here already opened)."""
    if not isinstance(options, dict):
        raise ConfigError("credential: expected a mapping such as {token_env: MY_TOKEN}")
    resolved: dict[str, str] = {}
    for key, value in options.items():
        if not isinstance(value, str):
            raise ConfigError(f"credential.{key}: expected a string")
        name = key.removesuffix("_env") if key.endswith("_env") else key
        if not name:
            raise ConfigError(f"credential.{key}: the name before _env is empty")
        if name in resolved or (name != key and name in options):
            raise ConfigError(f"credential: give {name} or {name}_env, not both")
        if name != key:
            if value not in os.environ:
                raise ConfigError(f"credential.{key}: environment variable {value} is not set")
            value = os.environ[value]
        resolved[name] = value
    return resolved


def _response_mapping(options: Any) -> tuple[JSONPath | None, PostProcess | None]:
    if not isinstance(options, dict):
        raise ConfigError("response: expected a mapping such as {jsonpath: '$.embeddings'}")
    unknown = set(options) - {"jsonpath", "post_process"}
    if unknown:
        raise ConfigError(f"response: unknown key(s) {', '.join(sorted(unknown))} "
                          "(expected jsonpath or post_process)")
    if "jsonpath" in options and "post_process" in options:
        raise ConfigError("response: give jsonpath or post_process, not both")
    if "jsonpath" in options:
        return _parse_jsonpath(options["jsonpath"]), None
    if "post_process" in options:
        return None, _import_function(options["post_process"])
    return None, None


def _parse_jsonpath(expression: Any) -> JSONPath:
    if not isinstance(expression, str):
        raise ConfigError("response.jsonpath: expected a string such as '$.embeddings'")
    try:
        return parse_jsonpath(expression)
    except (JSONPathError, ValueError) as exc:
        raise ConfigError(f"response.jsonpath: cannot parse {expression!r}: {exc}") from exc


def _import_function(spec: Any) -> PostProcess:
    module_name, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not module_name or not attr:
        raise ConfigError(f"response.post_process: expected 'module.path:function', "
                          f"not {spec!r}")
    try:
        module = importlib.import_module(module_name)
        function = functools.reduce(getattr, attr.split("."), module)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"response.post_process: cannot import {spec}: {exc}") from exc
    if not callable(function):
        raise ConfigError(f"response.post_process: {spec} is not a function")
    post_process: PostProcess = function
    return post_process

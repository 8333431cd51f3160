"""`openai`: forward each line to any OpenAI-compatible server over httpx.

Failures that may pass (429, 5xx, timeouts, dropped connections) come back as retriable
replies carrying the upstream's `Retry-After`; the worker's retry policy decides when to
try again. Everything else is kept as the upstream said it: status code and body.

Options beside the connection's:

- `endpoints`: the endpoints to offer, if the upstream serves other ones than
  `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and `/v1/responses` (add
  `/v1/moderations` for an upstream that has it).
- `responses`: how `/v1/responses` lines reach the upstream: `native` (posted to its
  `/responses`), `chat` (translated to chat completions and back), or `auto` (the default:
  native until the upstream answers that it has no such route, then chat).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import orjson

from batchery.model.batches import SUPPORTED_ENDPOINTS
from batchery.model.exceptions import ConfigError
from batchery.ports.backend import (
    CHAT_ENDPOINT,
    RESPONSES_ENDPOINT,
    ModelBackend,
    Reply,
    Request,
    error_reply,
)
from batchery.wire import responses_api

_RETRIABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
#: What a deployment offers unless its `endpoints` option says otherwise.
DEFAULT_ENDPOINTS = frozenset({CHAT_ENDPOINT, "/v1/completions", "/v1/embeddings",
                               RESPONSES_ENDPOINT})
#: `responses` option -> whether Responses go to the upstream as they are (None: find out).
_RESPONSES_MODES: dict[str, bool | None] = {"auto": None, "native": True, "chat": False}
#: Statuses with which a server says it has no such route.
_NO_ROUTE = frozenset({404, 405, 501})


class OpenAIBackend(ModelBackend):
    #: Everything it can forward; a deployment offers `declared_endpoints` of them.
    endpoints = frozenset(SUPPORTED_ENDPOINTS)

    def __init__(self, *, base_url: str, api_key_env: str | None = None,
                 api_key: str | None = None, model: str | None = None,
                 max_concurrency: int = 64, timeout_s: float = 120.0,
                 headers: dict[str, str] | None = None,
                 endpoints: list[str] | None = None, responses: str = "auto",
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        unknown = [e for e in endpoints or [] if e not in SUPPORTED_ENDPOINTS]
        if unknown or endpoints == []:
            raise ConfigError(f"endpoints: expected a non-empty list of "
                              f"{', '.join(SUPPORTED_ENDPOINTS)}; not {unknown or endpoints}")
        if responses not in _RESPONSES_MODES:
            raise ConfigError(f"responses: expected one of {', '.join(_RESPONSES_MODES)}, "
                              f"not {responses!r}")
        self.endpoints = self.declared_endpoints({"endpoints": endpoints})
        self._responses_native = _RESPONSES_MODES[responses]
        if api_key_env and api_key_env not in os.environ:
            raise ConfigError(f"options.api_key_env: the environment variable {api_key_env} "
                              f"is not set; export it where Batchery runs, or give api_key")
        key = os.environ[api_key_env] if api_key_env else api_key
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self._headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
        self._limit = asyncio.Semaphore(max(1, max_concurrency))
        self._max_concurrency = max_concurrency
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=self._max_concurrency,
                              max_keepalive_connections=self._max_concurrency)
        self._client = httpx.AsyncClient(headers=self._headers, limits=limits,
                                         timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                                         transport=self._transport)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _url(self, endpoint: str) -> str:
        path = endpoint.removeprefix("/v1") if self.base_url.endswith("/v1") else endpoint
        return self.base_url + path

    @classmethod
    def declared_endpoints(cls, options: Mapping[str, Any]) -> frozenset[str]:
        listed = options.get("endpoints")
        if not isinstance(listed, list):
            return DEFAULT_ENDPOINTS
        return frozenset(e for e in listed if e in SUPPORTED_ENDPOINTS)

    async def infer(self, endpoint: str, requests: Sequence[Request]) -> list[Reply]:
        if self._client is None:
            await self.start()
        if endpoint not in self.endpoints:
            return [error_reply(404, f"Invalid URL (POST {endpoint})") for _ in requests]
        if endpoint == RESPONSES_ENDPOINT:
            return await self._responses(requests)
        return await self._all(endpoint, [r.body for r in requests])

    async def _all(self, endpoint: str, bodies: Sequence[dict[str, Any]]) -> list[Reply]:
        url = self._url(endpoint)
        return list(await asyncio.gather(*(self._one(url, body) for body in bodies)))

    async def _responses(self, requests: Sequence[Request]) -> list[Reply]:
        """Responses natively, or as chat when the upstream has no `/responses` (found out
        from its first answers in `auto` mode, then remembered)."""
        if self._responses_native is False:
            return await self._responses_as_chat([r.body for r in requests])
        probing = self._responses_native is None
        replies = await self._all(RESPONSES_ENDPOINT, [r.body for r in requests])
        # Concurrent calls may all be probing: each one that was falls back on its own,
        # whichever of them found out first.
        if probing:
            lacking = [i for i, reply in enumerate(replies) if _no_route(reply)]
            if lacking:
                self._responses_native = False
                again = await self._responses_as_chat([requests[i].body for i in lacking])
                for i, reply in zip(lacking, again, strict=True):
                    replies[i] = reply
            elif any(r.ok for r in replies) and self._responses_native is None:
                self._responses_native = True
        return replies

    async def _responses_as_chat(self, bodies: Sequence[dict[str, Any]]) -> list[Reply]:
        return list(await asyncio.gather(*(self._one_as_chat(body) for body in bodies)))

    async def _one_as_chat(self, body: dict[str, Any]) -> Reply:
        try:
            chat = responses_api.to_chat(body)
        except responses_api.ParamsError as exc:
            return exc.reply()
        reply = await self._one(self._url(CHAT_ENDPOINT), chat)
        return responses_api.reply_from_chat(body, reply)

    async def _one(self, url: str, body: dict[str, Any]) -> Reply:
        assert self._client is not None
        if self.model:
            body = {**body, "model": self.model}
        async with self._limit:
            response = await send(self._client, "POST", url, timeout_s=self.timeout_s,
                                  content=orjson.dumps(body),
                                  headers={"Content-Type": "application/json"})
        return response if isinstance(response, Reply) else to_reply(response)


async def send(client: httpx.AsyncClient, method: str, url: str, *, timeout_s: float,
               **kwargs: Any) -> httpx.Response | Reply:
    """Send one request. A timeout or an unreachable upstream becomes a retriable error
    reply; the message never names the URL, which may carry a credential."""
    try:
        return await client.request(method, url, **kwargs)
    except httpx.TimeoutException:
        return error_reply(504, f"The upstream did not answer within {timeout_s:g}s.",
                           type_="timeout", code="upstream_timeout", retriable=True)
    except httpx.TransportError as exc:
        return error_reply(502, f"Could not reach the upstream: {type(exc).__name__}: {exc}",
                           type_="server_error", code="upstream_unreachable", retriable=True)


def _no_route(reply: Reply) -> bool:
    """Whether the upstream answered that it has no such route (not: no such model)."""
    if reply.status_code not in _NO_ROUTE:
        return False
    error = reply.body.get("error")
    return not (isinstance(error, dict) and error.get("code") == "model_not_found")


def to_reply(response: httpx.Response) -> Reply:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    status = response.status_code
    if not isinstance(body, dict):
        text = response.text[:1000]
        body = {"error": {"message": f"The upstream answered {status} with a "
                                     f"body that is not a JSON object: {text!r}",
                          "type": "server_error", "param": None, "code": "invalid_upstream_body"}}
        if 200 <= status < 300:
            status = 502  # no usable answer: an error line, not an output line
    retriable = status in _RETRIABLE_STATUS
    return Reply(status_code=status, body=body, retriable=retriable,
                 retry_after=_retry_after(response.headers) if retriable else None)


def _retry_after(headers: httpx.Headers) -> float | None:
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            if math.isfinite(seconds := float(ms) / 1000.0):
                return seconds
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None  # a header we cannot read: fall back to the retry policy's backoff
        return max(0.0, parsed.timestamp() - time.time())
    return seconds if math.isfinite(seconds) else None

"""Running the lines of one chunk: route each to its deployment, retry what may pass,
and render the output and error lines in the hosted API's format."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchery.model.batches import canonical_endpoint
from batchery.model.retry import RetryPolicy
from batchery.ports.backend import (
    CHAT_ENDPOINT,
    RESPONSES_ENDPOINT,
    ModelBackend,
    Reply,
    Request,
    error_reply,
)
from batchery.wire import anthropic, request_schemas, responses_api
from batchery.wire.openai_lines import response_line

#: Finds the started backend of a deployment, or None when no deployment has that name.
BackendLookup = Callable[[str], Awaitable[ModelBackend | None]]


#: Renders the result line of an answered request: `(custom_id, reply, model) -> line`.
Render = Callable[[str, Reply, Any], bytes]



#: The most lines of one model handed to its backend in one call. Lines finish, and are
#: committed, a slice at a time; slices of a chunk run concurrently, so a backend that
#: batches (an embedding model) still gets full batches while progress moves.
MAX_SLICE = 64
#: A chunk is cut into at least this many slices when it has the lines for it.
MIN_SLICES = 8


@dataclass(kw_only=True)
class ChunkOutput:
    """The answered lines of a chunk, rendered, as they come in. `take()` hands what came
    in since the last call to whoever commits it."""

    render: Render = response_line
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    n_ok: int = 0
    n_err: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    #: Where each answered line starts in the input (or its index, without offsets).
    offsets: list[int] = field(default_factory=list)
    #: (extension) The tokens above by model, `model -> (input, output)`: each model's
    #: deployment has its own prices.
    by_model: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, custom_id: str, reply: Reply, model: Any = None, offset: int = -1) -> None:
        self.add_all([custom_id], [reply], model, [offset])

    def take(self) -> ChunkOutput:
        """What came in so far; this output starts empty again."""
        taken = ChunkOutput(render=self.render, out=self.out, err=self.err, n_ok=self.n_ok,
                            n_err=self.n_err, input_tokens=self.input_tokens,
                            output_tokens=self.output_tokens, offsets=self.offsets,
                            by_model=self.by_model, cached_tokens=self.cached_tokens,
                            reasoning_tokens=self.reasoning_tokens)
        self.out, self.err, self.offsets, self.by_model = bytearray(), bytearray(), [], {}
        self.n_ok = self.n_err = self.input_tokens = self.output_tokens = 0
        self.cached_tokens = self.reasoning_tokens = 0
        return taken

    def add_all(self, custom_ids: Iterable[str], replies: Iterable[Reply],
                model: Any = None, offsets: Iterable[int] = ()) -> None:
        """Render and count the replies to a group of requests (the hot loop of a chunk:
        tallies stay in locals until the end, and the common usage shapes are read inline)."""
        self.offsets.extend(offsets)
        render, out, err = self.render, self.out, self.err
        n_ok = n_err = input_tokens = output_tokens = cached = reasoning = 0
        for custom_id, reply in zip(custom_ids, replies, strict=True):
            line = render(custom_id, reply, model)
            if not 200 <= reply.status_code < 300:
                err += line
                n_err += 1
                continue
            out += line
            n_ok += 1
            usage = reply.body.get("usage")
            if not isinstance(usage, dict):
                continue
            # Chat and completions count `prompt_tokens`, Responses `input_tokens`. Plain
            # ints are added inline; anything else goes through `_int` (a bool or junk
            # counts nothing).
            value = usage["prompt_tokens"] if "prompt_tokens" in usage \
                else usage.get("input_tokens")
            input_tokens += value if type(value) is int else _int(value)
            value = usage["completion_tokens"] if "completion_tokens" in usage \
                else usage.get("output_tokens")
            output_tokens += value if type(value) is int else _int(value)
            if _DETAILS.isdisjoint(usage):
                continue
            cached += _detail(usage, "prompt_tokens_details", "input_tokens_details",
                              "cached_tokens")
            reasoning += _detail(usage, "completion_tokens_details", "output_tokens_details",
                                 "reasoning_tokens")
        self.n_ok += n_ok
        self.n_err += n_err
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cached_tokens += cached
        self.reasoning_tokens += reasoning
        if input_tokens or output_tokens:
            before = self.by_model.get(str(model), (0, 0))
            self.by_model[str(model)] = (before[0] + input_tokens, before[1] + output_tokens)


#: The usage fields that hold details (cached and reasoning tokens).
_DETAILS = frozenset({"prompt_tokens_details", "input_tokens_details",
                      "completion_tokens_details", "output_tokens_details"})


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _detail(usage: dict[str, Any], chat: str, responses: str, name: str) -> int:
    """A count inside the usage's details: chat spells the details object one way,
    Responses the other."""
    details = usage.get(chat, usage.get(responses))
    return _int(details.get(name)) if isinstance(details, dict) else 0



def lines_at(data: bytes, base: int) -> list[tuple[int, bytes]]:
    """The non-blank lines of `data`, each with where it starts (`data` starts at `base`)."""
    found: list[tuple[int, bytes]] = []
    at = base
    for line in data.split(b"\n"):
        if line and not line.isspace():
            found.append((at, line))
        at += len(line) + 1
    return found


def split_lines(data: bytes) -> list[bytes]:
    """The non-blank lines of `data`."""
    return [line for line in data.split(b"\n") if line and not line.isspace()]


async def run_chunk(lines: Sequence[bytes], endpoint: str, lookup: BackendLookup,
                    policy: RetryPolicy, *, offsets: Sequence[int] | None = None,
                    output: ChunkOutput | None = None) -> ChunkOutput:
    """Run the lines, adding each answer to `output` as its slice finishes. `offsets`
    (where each line starts in the input) are recorded with the answers."""
    # Anthropic Messages lines run on chat backends: translated in, and rendered back out.
    messages = endpoint == anthropic.MESSAGES_ENDPOINT
    if output is None:
        output = ChunkOutput(render=anthropic.result_line if messages else response_line)
    where = offsets if offsets is not None else range(len(lines))
    target = anthropic.CHAT_ENDPOINT if messages else endpoint
    # Checked once here for every backend: a body of the wrong shape never reaches one.
    # (The schema is looked up once per chunk, not once per line.)
    schema = request_schemas.SCHEMAS.get(canonical_endpoint(target))
    valid = schema.fast() if schema is not None else None
    #: model -> (offsets, requests), kept side by side.
    groups: dict[str, tuple[list[int], list[Request]]] = {}
    loads = orjson.loads
    for offset, raw in zip(where, lines, strict=True):
        obj = loads(raw)
        body = obj["body"]
        if messages:
            try:
                body = anthropic.to_chat(body)
            except anthropic.ParamsError as exc:
                output.add(obj["custom_id"], error_reply(400, str(exc)), body.get("model"),
                           offset)
                continue
        if valid is not None and schema is not None and not valid(body):
            # Only a wrong body pays for the walk that finds its words.
            problem = schema.check(body, "")
            if problem is not None:
                output.add(obj["custom_id"], problem.reply(), body.get("model"), offset)
                continue
        bucket = groups.get(body["model"])
        if bucket is None:
            bucket = groups[body["model"]] = ([], [])
        bucket[0].append(offset)
        bucket[1].append(Request(custom_id=obj["custom_id"], body=body))
    size = max(1, min(MAX_SLICE, -(-len(lines) // MIN_SLICES)))

    async def run_slice(model: str, at: list[int], requests: list[Request]) -> None:
        replies = await _run_group(model, requests, target, lookup, policy)
        output.add_all([r.custom_id for r in requests], replies, model, at)

    try:
        # A slice that raises cancels the others: the chunk is handed back as a whole.
        async with asyncio.TaskGroup() as group:
            for model, (at, requests) in groups.items():
                step = await _slice_size(lookup, model, len(requests), size)
                for i in range(0, len(requests), step):
                    group.create_task(run_slice(model, at[i:i + step],
                                                requests[i:i + step]))
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return output


async def _slice_size(lookup: BackendLookup, model: str, n: int, size: int) -> int:
    """Lines per call for `model`: `size`, unless its backend takes whole chunks."""
    backend = await lookup(model) if n > size else None
    if backend is not None and backend.max_lines_per_call is not None:
        return max(1, backend.max_lines_per_call)
    return size


async def _run_group(model: str, requests: list[Request], endpoint: str,
                     lookup: BackendLookup, policy: RetryPolicy) -> list[Reply]:
    backend = await lookup(model)
    if backend is None:
        reply = error_reply(404, f"The model '{model}' does not exist.", param="model",
                            code="model_not_found")
        return [reply] * len(requests)
    if endpoint == RESPONSES_ENDPOINT and RESPONSES_ENDPOINT not in backend.endpoints \
            and CHAT_ENDPOINT in backend.endpoints:
        return await _responses_as_chat(backend, requests, policy)
    return await call_with_retry(backend, endpoint, requests, policy)


async def _responses_as_chat(backend: ModelBackend, requests: list[Request],
                             policy: RetryPolicy) -> list[Reply]:
    """Responses requests on a chat backend: translated in, and the answers back out. A
    request that cannot be translated is a 400 of its own; the others still run."""
    replies: list[Reply | None] = [None] * len(requests)
    chat: list[Request] = []
    at: list[int] = []
    for i, request in enumerate(requests):
        try:
            body = responses_api.to_chat(request.body)
        except responses_api.ParamsError as exc:
            replies[i] = exc.reply()
            continue
        chat.append(Request(custom_id=request.custom_id, body=body))
        at.append(i)
    if chat:
        answers = await call_with_retry(backend, CHAT_ENDPOINT, chat, policy)
        for i, answer in zip(at, answers, strict=True):
            replies[i] = responses_api.reply_from_chat(requests[i].body, answer)
    return [r for r in replies if r is not None]


async def call_with_retry(backend: ModelBackend, endpoint: str, requests: Sequence[Request],
                          policy: RetryPolicy) -> list[Reply]:
    """Call the backend, then call it again for the retriable failures, within the budget."""
    replies: list[Reply] = await backend.infer(endpoint, requests)
    pending = [i for i, r in enumerate(replies) if r.retriable]
    attempt = 1
    while pending and policy.should_retry(attempt):
        hints = [h for i in pending if (h := replies[i].retry_after) is not None]
        await asyncio.sleep(policy.delay(attempt, max(hints) if hints else None))
        attempt += 1
        again = await backend.infer(endpoint, [requests[i] for i in pending])
        for i, reply in zip(pending, again, strict=True):
            replies[i] = reply
        pending = [i for i in pending if replies[i].retriable]
    return replies

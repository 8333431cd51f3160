"""(extension) Estimating the input tokens and cost of a batch input file before a batch is
created from it.

No tokenizer is needed (or downloaded): a request's input tokens are estimated as the UTF-8
bytes of its text divided by four, rounded up, plus one token per token id it gives. Its
text is what a model reads: messages' and content parts' `content` and `text`, `prompt`,
`input`, `instructions` and `system`; images and other media are not counted. Four bytes a
token is the usual rule of thumb for English text with BPE tokenizers; other languages and
code run higher. Output tokens are not estimated: they depend on the answers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchery.model import spend

#: UTF-8 bytes of text per estimated token.
BYTES_PER_TOKEN = 4
METHOD = ("bytes/4: the UTF-8 bytes of each request's text (messages, prompt, input, "
          "instructions, system), divided by 4 and rounded up, plus one token per token id; "
          "media are not counted, and output tokens are not estimated")
#: The fields whose values a model reads as text, at any depth of a request's body.
_TEXT_KEYS = ("messages", "content", "text", "prompt", "input", "instructions", "system")


@dataclass(kw_only=True, slots=True)
class ModelEstimate:
    model: str
    requests: int = 0
    input_tokens: int = 0
    #: US dollars per million tokens, if the model has prices.
    prices: dict[str, float] | None = None

    @property
    def cost(self) -> float | None:
        if self.prices is None:
            return None
        return spend.cost(self.prices, self.input_tokens, 0)


@dataclass(kw_only=True, slots=True)
class Estimate:
    file_id: str
    #: The model every request was priced at, or None: each at its own `body.model`.
    model: str | None
    requests: int = 0
    #: Lines that are not JSON requests with a body (validation would refuse them).
    invalid_lines: int = 0
    models: dict[str, ModelEstimate] = field(default_factory=dict)

    @property
    def input_tokens(self) -> int:
        return sum(m.input_tokens for m in self.models.values())

    @property
    def cost(self) -> float | None:
        """The input cost, when every model has prices (else None)."""
        costs = [m.cost for m in self.models.values()]
        if any(c is None for c in costs):
            return None
        return sum(c for c in costs if c is not None)


def estimate(file_id: str, lines: Iterable[bytes], prices: Mapping[str, dict[str, float] | None],
             model: str | None = None) -> Estimate:
    """Estimate the requests of `lines`. `prices` maps the models the caller may use to their
    prices (None: none declared); `model`, if given, prices every request at that model."""
    found = Estimate(file_id=file_id, model=model)
    for raw in lines:
        if not raw.strip():
            continue
        body = _body(raw)
        if body is None:
            found.invalid_lines += 1
            continue
        name = model if model is not None else str(body.get("model"))
        entry = found.models.get(name)
        if entry is None:
            entry = found.models[name] = ModelEstimate(model=name, prices=prices.get(name))
        entry.requests += 1
        entry.input_tokens += tokens_of(body)
        found.requests += 1
    return found


def tokens_of(body: Mapping[str, Any]) -> int:
    """The estimated input tokens of one request's body."""
    text_bytes, ids = _measure(body)
    return -(-text_bytes // BYTES_PER_TOKEN) + ids


def _measure(value: Any) -> tuple[int, int]:
    """(UTF-8 bytes of text, token ids) in `value`."""
    if isinstance(value, str):
        return len(value.encode()), 0
    if isinstance(value, bool):
        return 0, 0
    if isinstance(value, int):
        return 0, 1  # a token id, in a prompt or input given as ids
    if isinstance(value, list):
        parts = [_measure(v) for v in value]
    elif isinstance(value, dict):
        parts = [_measure(value[k]) for k in _TEXT_KEYS if k in value]
    else:
        return 0, 0
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _body(raw: bytes) -> dict[str, Any] | None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    body = line.get("body") if isinstance(line, dict) else None
    return body if isinstance(body, dict) else None

"""Usage and spend (extension): deployments' prices, what tokens cost, and a batch's spend
ceilings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchery.model.exceptions import ConfigError, InvalidRequest

#: Prices are in US dollars per this many tokens.
PER_TOKENS = 1_000_000
PRICE_KINDS = ("input", "output")


def parse_prices(raw: Any, where: str) -> dict[str, float] | None:
    """A deployment's `prices:` mapping, `{input: usd per 1M tokens, output: …}`; a kind
    left out costs nothing. Raises ConfigError saying where and what was expected."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw or set(raw) - set(PRICE_KINDS):
        raise ConfigError(f"{where}: expected a mapping of 'input' and 'output' prices in "
                          f"US dollars per million tokens, such as {{input: 0.15, "
                          f"output: 0.6}}")
    prices: dict[str, float] = {}
    for kind, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}.{kind}: expected a number of US dollars per million "
                              f"tokens (0 or more), not {value!r}")
        prices[kind] = float(value)
    return prices


def cost(prices: Mapping[str, float] | None, input_tokens: int, output_tokens: int) -> float:
    """What the tokens cost at `prices` (none: nothing)."""
    if not prices:
        return 0.0
    return (input_tokens * prices.get("input", 0.0)
            + output_tokens * prices.get("output", 0.0)) / PER_TOKENS


@dataclass(frozen=True, slots=True)
class Ceilings:
    max_cost: float | None = None
    max_total_tokens: int | None = None


#: The largest `max_total_tokens` (the database stores a signed 64-bit count).
MAX_TOKENS = 2**62


def ceilings(max_cost: Any, max_total_tokens: Any) -> Ceilings:
    """A create request's spend ceilings, checked: 400s that name the field."""
    if max_cost is not None and (isinstance(max_cost, bool)
                                 or not isinstance(max_cost, int | float)
                                 or not math.isfinite(max_cost) or max_cost <= 0):
        raise InvalidRequest("Invalid value for 'max_cost': expected a number of US dollars "
                             "greater than 0.", param="max_cost", code="invalid_value")
    # JSON has one kind of number: 1000.0 is the whole number 1000, as JSON Schema says.
    if isinstance(max_total_tokens, float) and max_total_tokens.is_integer():
        max_total_tokens = int(max_total_tokens)
    if max_total_tokens is not None and (isinstance(max_total_tokens, bool)
                                         or not isinstance(max_total_tokens, int)
                                         or not 1 <= max_total_tokens <= MAX_TOKENS):
        raise InvalidRequest(f"Invalid value for 'max_total_tokens': expected a whole number "
                             f"of tokens from 1 to {MAX_TOKENS}.", param="max_total_tokens",
                             code="invalid_value")
    return Ceilings(None if max_cost is None else float(max_cost), max_total_tokens)


def ceiling_message(max_cost: float | None, max_total_tokens: int | None) -> str:
    """Why the unrun lines of a batch stopped by a ceiling did not run, in a sentence."""
    which = [f"max_total_tokens={max_total_tokens}" if max_total_tokens is not None else "",
             f"max_cost={max_cost:g}" if max_cost is not None else ""]
    named = " or ".join(w for w in which if w) or "a spend ceiling"
    return (f"This request was not executed because the batch reached its spend ceiling "
            f"({named}).")

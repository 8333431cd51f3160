"""(extension) Priorities of batches, message batches and jobs: whole numbers, higher first.
Work is claimed by priority, then by the earliest deadline, then by age."""

from __future__ import annotations

from typing import Any

from batchery.model.exceptions import InvalidRequest

DEFAULT_PRIORITY = 0
#: The bounds of a priority: wide enough for any scheme of levels, narrow enough that no
#: caller can push every other's work behind a number nobody can beat.
MIN_PRIORITY = -1000
MAX_PRIORITY = 1000


def parse_priority(value: Any, param: str = "priority", *, digits: bool = False) -> int:
    """A request's `priority` (None: the default), or a 400 that says what is expected.
    With `digits`, a string of digits counts too, as protobuf's JSON writes 64-bit
    integers (Gemini)."""
    if value is None:
        return DEFAULT_PRIORITY
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON does not tell 5.0 from 5
    if digits and isinstance(value, str) and value.removeprefix("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) \
            or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidRequest(f"Invalid value for '{param}': expected a whole number from "
                             f"{MIN_PRIORITY} to {MAX_PRIORITY} (higher runs first; the "
                             f"default is {DEFAULT_PRIORITY}), but got {value!r}.",
                             param=param, code="invalid_value")
    return value

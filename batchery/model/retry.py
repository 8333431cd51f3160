"""Retry policy for single requests: bounded attempts, exponential backoff with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    #: Attempts in all, the first one included.
    max_attempts: int = 4
    #: Delay before the first retry, in seconds; doubles each time.
    base_delay_s: float = 0.5
    #: No single wait is longer than this, `Retry-After` included.
    max_delay_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay_s)
        backoff = self.base_delay_s * (2 ** (attempt - 1))
        # Full jitter spreads retries of many lines so they do not hit the upstream together.
        return min(self.max_delay_s, random.uniform(backoff / 2, backoff))

    def should_retry(self, attempt: int) -> bool:
        return attempt < self.max_attempts

"""The lease core's rules, shared by every kind of queued work: batch chunks, batch phases
(validate, finalize, remote steps), job enqueue, job batches and job completion.

A unit of work is a row that a worker claims under a lease: an owner, a random token and an
expiry. A heartbeat renews the lease while the work runs; every write the work makes names the
token, so a worker that lost its lease (to a cancel, or to another worker after it stopped
renewing) changes nothing. What a unit of work *is* stays with its product; the rules below
are the same for all of them.

Two kinds of failure are kept apart:

- **An attempt** fails when the work itself raised (a backend or predictor error, a bad
  file). Attempts are bounded: the work fails for good after `max_attempts`.
- **An expiry** is a lease that ran out because its worker stopped renewing it: killed,
  out of memory, a machine reclaimed. That is not the work's fault, so it costs no attempt.
  Work whose leases keep expiring without committing any progress is split in halves
  (`SPLIT_AFTER_EXPIRIES`), until it completes or a single line or item is shown to take
  its worker down (`POISON_AFTER_EXPIRIES`): only that one then fails.
"""

from __future__ import annotations

#: How long a claim lasts without a heartbeat, in seconds.
DEFAULT_LEASE_S = 30.0
#: A chunk or job batch whose work raised this many times fails for good.
DEFAULT_MAX_ATTEMPTS = 5
#: After batch- or job-level work (a phase) raised, how long before anyone tries it again.
PHASE_RETRY_S = 5.0
#: A phase that failed this many times in a row (raised, or lost its worker) ends its batch
#: or job `failed`, with the last error as the reason: nothing waits forever.
MAX_PHASE_ATTEMPTS = 5
#: Work whose lease ran out this many times in a row, without committing progress in
#: between, is split in two.
SPLIT_AFTER_EXPIRIES = 2
#: A single line or item whose lease ran out this many times in a row is poison: it fails.
POISON_AFTER_EXPIRIES = 3
#: The error code of a line or item that repeatedly took its worker down.
WORKER_CRASHED = "worker_crashed"


def should_split(expiries: int, units: int) -> bool:
    """Whether work of `units` lines or items, whose leases ran out `expiries` times in a
    row, is cut in two before it runs again."""
    return units > 1 and expiries >= SPLIT_AFTER_EXPIRIES


def is_poison(expiries: int, units: int) -> bool:
    """Whether a single line or item took its worker down often enough to fail."""
    return units == 1 and expiries >= POISON_AFTER_EXPIRIES


def halves(n: int) -> int:
    """Where to cut `n` units: the size of the first half."""
    return max(1, n // 2)

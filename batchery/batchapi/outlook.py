"""(extension) What a new batch is told about the queue it joins, in its `warnings`: that no
worker is running, or that the work queued ahead of it would outlast its completion window
at the throughput measured lately. The batch is created all the same."""

from __future__ import annotations

from collections.abc import Sequence

from batchery.model.batches import Batch
from batchery.ports.store import BatchApiStore, count_live

#: Throughput is measured on the batches that ran within this many seconds.
MEASURE_S = 3600
NO_WORKER = ("No worker is running: the batch waits until one starts (`batchery worker`, or "
             "`batchery serve` with --workers above 0).")


def warnings(store: BatchApiStore, *, priority: int, window_s: int,
             now: float) -> list[str] | None:
    """The warnings of a batch of `priority` and a window of `window_s` seconds created at
    `now`, or None when there is nothing to say."""
    found: list[str] = []
    if count_live(store.list_workers(), now) == 0:
        found.append(NO_WORKER)
    late = _late(store, priority, window_s, int(now))
    if late is not None:
        found.append(late)
    return found or None


def _late(store: BatchApiStore, priority: int, window_s: int, now: int) -> str | None:
    ahead = store.lines_ahead(priority)
    if ahead == 0:
        return None  # the usual case: nothing is measured
    rate = throughput(store.recent_runs(now - MEASURE_S), now)
    if rate is None or ahead / rate <= window_s:
        return None
    return (f"{ahead} requests of priority {priority} or higher are queued ahead of this "
            f"batch. At the {rate:.3g} requests per second measured over the last hour they "
            f"need about {duration(ahead / rate)}, longer than its completion window of "
            f"{duration(window_s)}, so it may expire before all its requests run.")


def throughput(runs: Sequence[Batch], now: int) -> float | None:
    """Requests answered per second while workers were busy: the lines `runs` answered,
    over the union of the times they ran. None when there is too little to measure."""
    spans: list[tuple[int, int]] = []
    lines = 0
    for batch in runs:
        if batch.in_progress_at is None:
            continue
        spans.append((batch.in_progress_at, max(_stopped_at(batch) or now,
                                                batch.in_progress_at)))
        lines += batch.completed + batch.failed - batch.unrun
    busy = _union_length(spans)
    if lines <= 0 or busy < 1:
        return None
    return lines / busy


def _stopped_at(batch: Batch) -> int | None:
    """When a batch's lines stopped running (None: they still may run)."""
    return (batch.finalizing_at or batch.cancelling_at or batch.completed_at
            or batch.cancelled_at or batch.expired_at or batch.failed_at)


def _union_length(spans: list[tuple[int, int]]) -> int:
    total, reach = 0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def duration(seconds: float) -> str:
    """`seconds` as a person would say it: 45 s, 12 min, 3.5 h, 2.1 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"

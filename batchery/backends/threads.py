"""How many CPU threads an in-process model uses in one worker, when its deployment does
not say: the host's cores shared out among the worker processes that `batchery serve`
runs on it, at least one each.

On CPUs, worker processes that each own their share of the cores outrun threads that
wait on each other (see benchmarks/RESULTS-runtimes.md): `serve --workers 2` on 2 cores
gives each worker 1 thread; a lone `batchery worker` uses every core, as a user's own
script would."""

from __future__ import annotations

import os

#: Set by `batchery serve` for the workers it starts: how many run on this host.
HOST_WORKERS_ENV = "BATCHERY_HOST_WORKERS"


def cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS tells it)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


def host_workers() -> int:
    """How many worker processes share this host: `BATCHERY_HOST_WORKERS`, else 1."""
    raw = os.environ.get(HOST_WORKERS_ENV, "")
    try:
        return max(1, int(raw))
    except ValueError:
        return 1


def default_threads(n_cores: int | None = None, workers: int | None = None) -> int:
    """max(1, cores // workers on this host)."""
    n_cores = cores() if n_cores is None else n_cores
    workers = host_workers() if workers is None else workers
    return max(1, n_cores // max(1, workers))

"""A worker's CPU per 1000 echo lines against a bare loop, in one process, in one run.

CPU time (not wall time) of the same work done two ways, so that other processes on a busy
machine move the figures little:

1. **bare loop**: every line of the input parsed with orjson, answered by the echo model's
   per-line function (`batchery.backends.echo.answer`) and rendered as an output line
   (`response_line`), in memory;
2. **worker**: the same input uploaded and created as a batch on a fresh SQLite data
   directory, then one `Worker` of `batchery.workers` (what `batchery worker` runs: claims,
   leases with their heartbeat thread, part files, commits) driven turn by turn in this
   process until the batch leaves `in_progress`. Validation runs first and is not counted.
   `gc.freeze()` is called after start-up, as `Worker.run` does (`--no-freeze`: not, as
   workers did before; with `PYTHONPATH=<an older tree>` the script measures that tree).

    .venv/bin/python benchmarks/bench_worker_cpu.py --lines 200000 --rounds 3

`--store` adds the CPU spent in each store call per 1000 lines; `--profile N` prints
cProfile's top N functions of one more round (cProfile slows Python code down several times,
so read its shares, not its times).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import io
import os
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from batchery.backends.echo import answer
from batchery.model.batches import DEFAULT_CHUNK_SIZE
from batchery.queue.worker import WorkerConfig
from batchery.runtime import Runtime, open_runtime
from batchery.security.trust import OPEN_PRINCIPAL
from batchery.settings import Settings
from batchery.wire.openai_lines import response_line
from batchery.workers import worker as make_worker

STORE_CALLS = ("claim_chunk", "complete_chunk", "commit_part", "claim_phase", "renew_chunk",
               "done_offsets", "heartbeat_worker", "expire_due", "reap_expired", "get_batch")


def make_input(n: int) -> bytes:
    return b"".join(orjson.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "echo", "messages": [{"role": "user",
                                                "content": f"hello number {i}"}]},
    }) + b"\n" for i in range(n))


def bare_loop(data: bytes) -> float:
    """CPU seconds of the bare loop over `data`."""
    out = io.BytesIO()
    started = time.process_time()
    for raw in data.splitlines():
        obj = orjson.loads(raw)
        out.write(response_line(obj["custom_id"], answer(obj["url"], obj["body"])))
    return time.process_time() - started


def _timed_store(runtime: Runtime, spent: collections.Counter[str]) -> None:
    """Wrap the store's calls to add up the CPU time (of the calling thread) of each."""
    for name in STORE_CALLS:
        call = getattr(runtime.store, name)

        def timed(*args: Any, _call: Callable[..., Any] = call, _name: str = name,
                  **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return _call(*args, **kwargs)
            finally:
                spent[_name] += time.thread_time() - started

        setattr(runtime.store, name, timed)


def worker_run(data: bytes, chunk_size: int, *, store: bool = False, freeze: bool = True,
               profile: cProfile.Profile | None = None) -> dict[str, Any]:
    """One batch of `data` through one in-process worker: CPU seconds during execution."""
    root = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    runtime = open_runtime(Settings(data_dir=root, chunk_size=chunk_size),
                           publish_deployments=True)
    try:
        project = OPEN_PRINCIPAL.project
        upload = runtime.service.upload(project, io.BytesIO(data), filename="in.jsonl",
                                        purpose="batch")
        batch = runtime.service.create_batch(project, input_file_id=upload.id,
                                             endpoint="/v1/chat/completions")
        spent: collections.Counter[str] = collections.Counter()
        worker = make_worker(runtime.store, runtime.files,
                             WorkerConfig(webhooks=False, jobs=False))
        for handler in worker.handlers:
            handler.start()
        if freeze:
            gc.collect()
            gc.freeze()
        status = runtime.store.get_batch

        def state() -> str:
            found = status(None, batch.id)
            assert found is not None
            return found.status.value

        while state() == "validating":
            worker.run_once()
        if store:
            _timed_store(runtime, spent)
        if profile is not None:
            profile.enable()
        started, wall = time.process_time(), time.perf_counter()
        while state() == "in_progress":
            worker.run_once()
        cpu = time.process_time() - started
        wall = time.perf_counter() - wall
        if profile is not None:
            profile.disable()
        done = status(None, batch.id)
        assert done is not None and done.completed == data.count(b"\n"), done
        gc.unfreeze()
        for handler in worker.handlers:
            handler.close()
        return {"cpu_s": cpu, "wall_s": wall, "store_s": dict(spent)}
    finally:
        runtime.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", action="store_true", help="CPU per store call")
    parser.add_argument("--no-freeze", action="store_true",
                        help="no gc.freeze() after start-up (as workers did before it)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile one more round; print its top N functions")
    args = parser.parse_args()
    data = make_input(args.lines)
    per_k = 1000 / args.lines
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    bare, work = [], []
    stores: list[dict[str, float]] = []
    for _ in range(args.rounds):  # alternating, so that both see the same machine
        bare.append(bare_loop(data))
        run = worker_run(data, args.chunk_size, store=args.store, freeze=not args.no_freeze)
        work.append(run["cpu_s"])
        stores.append(run["store_s"])
    b, w = statistics.median(bare), statistics.median(work)
    print(f"{args.lines:,} lines, chunks of {args.chunk_size}, {args.rounds} rounds; load "
          f"average at start {load}, at end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"bare loop: {1000 * b * per_k:.2f} ms CPU per 1000 lines "
          f"(rounds: {', '.join(f'{1000 * x * per_k:.2f}' for x in bare)})")
    print(f"worker:    {1000 * w * per_k:.2f} ms CPU per 1000 lines "
          f"(rounds: {', '.join(f'{1000 * x * per_k:.2f}' for x in work)})")
    print(f"ratio:     {w / b:.2f}x (medians; per round: "
          f"{', '.join(f'{x / y:.2f}' for x, y in zip(work, bare, strict=True))})")
    if args.store:
        print("\nstore calls, ms CPU per 1000 lines (median of the rounds):")
        for name in STORE_CALLS:
            values = [s.get(name, 0.0) for s in stores]
            if any(values):
                print(f"  {name:18s} {1000 * statistics.median(values) * per_k:.3f}")
    if args.profile:
        profile = cProfile.Profile()
        worker_run(data, args.chunk_size, profile=profile, freeze=not args.no_freeze)
        print()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()

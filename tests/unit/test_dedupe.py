"""The duplicate check of batch validation: exact, and in memory that does not grow with
the number of lines (sorted runs spilled to temporary files)."""

from __future__ import annotations

import io
import os
import random
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchery.batchapi import validation
from batchery.batchapi.dedupe import DEFAULT_BUFFER, DuplicateFinder, Duplicates
from tests.helpers import chat_line, jsonl


def reference(ids: list[str], limit: int) -> Duplicates:
    """Lines (1-based) whose id appeared on an earlier line, with a plain set."""
    seen: set[str] = set()
    lines = []
    for line, custom_id in enumerate(ids, start=1):
        if custom_id in seen:
            lines.append(line)
        seen.add(custom_id)
    return Duplicates(count=len(lines), lines=lines[:limit])


def as_lines(ids: list[str]) -> Callable[[], Iterable[bytes]]:
    return lambda: (orjson.dumps({"custom_id": c}) + b"\n" for c in ids)


def key_of(raw: bytes) -> str:
    custom_id: str = orjson.loads(raw)["custom_id"]
    return custom_id


def find(ids: list[str], *, limit: int = 100, exact: bool = True, tmp_dir: Path | None = None,
         **options: Any) -> tuple[Duplicates, int]:
    with DuplicateFinder(tmp_dir=None if tmp_dir is None else str(tmp_dir),
                         **options) as finder:
        for line, custom_id in enumerate(ids, start=1):
            finder.add(line, custom_id)
        found = finder.duplicates(limit=limit, reread=as_lines(ids) if exact else None,
                                  key_of=key_of)
        return found, finder.runs_written


def sample_ids(n: int, distinct: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"req-{rng.randrange(distinct)}" for _ in range(n)]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


linux_only = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


def test_no_duplicates_and_no_temporary_file_under_the_buffer() -> None:
    ids = [f"r{i}" for i in range(5000)]
    assert find(ids) == (Duplicates(count=0, lines=[]), 0)
    assert find(ids[:1]) == (Duplicates(count=0, lines=[]), 0)
    assert find([]) == (Duplicates(count=0, lines=[]), 0)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(("n", "distinct"), [(3000, 2500), (3000, 40), (3000, 1)])
def test_duplicates_are_found_across_runs(n: int, distinct: int, exact: bool) -> None:
    """A buffer of 64 records and runs merged two at a time: many runs, several merge
    passes, and suspects spilled too; the answer is the one a set gives."""
    ids = sample_ids(n, distinct, seed=n + distinct)
    found, runs = find(ids, limit=100, exact=exact, buffer_size=64, fan_in=2,
                       suspect_budget=4096)
    assert runs > n // 64
    assert found == reference(ids, 100)


def test_a_repeat_far_apart_across_runs_is_found() -> None:
    ids = [f"r{i}" for i in range(10_000)] + ["r17", "r9999"]
    found, runs = find(ids, buffer_size=100, fan_in=4)
    assert runs >= 100
    assert found == Duplicates(count=2, lines=[10_001, 10_002])


def test_the_count_is_whole_and_the_lines_listed_are_the_first() -> None:
    ids = ["same"] * 500 + [f"r{i}" for i in range(500)] + ["r3"] * 10
    found, _ = find(ids, limit=100, buffer_size=50, fan_in=3)
    assert found.count == 499 + 10
    assert found.lines == list(range(2, 102))


@pytest.mark.parametrize("spill", [False, True])
def test_ids_that_merely_hash_alike_are_not_duplicates(spill: bool) -> None:
    """A hash of two values: nearly every pair collides, and only equal ids count."""
    ids = sample_ids(2000, 1500, seed=7)
    options: dict[str, Any] = {"hash_fn": lambda c: len(c) % 2}
    if spill:
        options |= {"buffer_size": 32, "fan_in": 2, "suspect_budget": 2048}
    found, runs = find(ids, **options)
    assert (runs > 0) is spill
    assert found == reference(ids, 100)
    assert found.count > 0
    # Without a second pass over the input the hash stands in for the id: every line after
    # the first of each hash repeats it.
    assert find(ids, exact=False, **options)[0].count == len(ids) - 2


@linux_only
def test_temporary_files_are_gone_after_the_answer(tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    before = open_fds()
    ids = sample_ids(5000, 3000, seed=3)
    found, runs = find(ids, tmp_dir=spill_dir, buffer_size=128, fan_in=4,
                       suspect_budget=4096)
    assert runs > 0 and found == reference(ids, 100)
    assert open_fds() == before
    assert list(spill_dir.iterdir()) == []


@linux_only
def test_temporary_files_are_gone_after_an_error(tmp_path: Path) -> None:
    """Validation cut short (a cancel raises out of the input), or a failing second pass."""
    before = open_fds()
    with pytest.raises(RuntimeError, match="cancelled"), \
            DuplicateFinder(buffer_size=64, tmp_dir=str(tmp_path)) as finder:
        for line in range(1, 1000):
            finder.add(line, f"r{line % 300}")
        assert finder.runs_written > 0 and open_fds() > before
        raise RuntimeError("cancelled")
    assert open_fds() == before

    def broken() -> Iterable[bytes]:
        yield orjson.dumps({"custom_id": "a"})
        raise OSError("the input went away")

    finder = DuplicateFinder(buffer_size=16, tmp_dir=str(tmp_path))
    for line in range(1, 200):
        finder.add(line, "a")
    with pytest.raises(OSError, match="went away"):
        finder.duplicates(limit=10, reread=broken, key_of=key_of)
    assert finder.runs_written > 0 and open_fds() == before
    assert list(tmp_path.iterdir()) == []


def id_of(line: int) -> str:
    """Every tenth line repeats the id of line / 10 (unless that line is a tenth too)."""
    return f"request-{line if line % 10 else line // 10}"


def peak_bytes(n: int) -> int:
    """tracemalloc's peak while `n` ids are added and checked, with the second pass over
    the input; the ids are made one at a time, as validation parses them, never held."""
    finder = DuplicateFinder(buffer_size=8192, fan_in=4, suspect_budget=128 << 10)
    reread = lambda: (orjson.dumps({"custom_id": id_of(line)})  # noqa: E731
                      for line in range(1, n + 1))
    tracemalloc.start()
    try:
        for line in range(1, n + 1):
            finder.add(line, id_of(line))
        found = finder.duplicates(limit=100, reread=reread, key_of=key_of)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found.count == n // 10 - n // 100
    assert found.lines == [line for line in range(10, 2000, 10) if line % 100][:100]
    return peak


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_lines() -> None:
    """Ten times the lines, no more memory at the peak: what is held is set by the buffer
    (8192 records of 16 bytes here), the merge's share of it and the suspects' budget (128
    KiB), never 8 bytes a line (8 MB for 1M). Both sizes spill and merge in several passes,
    so both reach the bound."""
    small, big = peak_bytes(100_000), peak_bytes(1_000_000)
    print(f"tracemalloc peak: {small / 1e6:.2f} MB for 100k ids, {big / 1e6:.2f} MB for 1M")
    assert big <= small * 1.25 + (64 << 10)
    assert big < 1_000_000 * 8 // 4


@pytest.mark.slow
def test_validation_past_the_buffer_names_the_duplicate_lines(tmp_path: Path) -> None:
    """A batch of more requests than the buffer holds (262,144): validation spills runs to
    its temporary directory, names the repeats as it does for a small file, and leaves the
    directory empty."""
    n = DEFAULT_BUFFER + 40_000
    ids = [f"req-{i}" for i in range(n)]
    ids[n - 1] = ids[3]
    ids[DEFAULT_BUFFER + 7] = ids[DEFAULT_BUFFER - 9]
    data = jsonl(chat_line(custom_id) for custom_id in ids)
    before = open_fds() if Path("/proc/self/fd").is_dir() else 0
    report = validation.validate(
        validation.iter_lines(io.BytesIO(data)), endpoint="/v1/chat/completions",
        model_known={"echo"}.__contains__, max_tasks=n, chunk_size=1000,
        reread=lambda: validation.iter_lines(io.BytesIO(data)), tmp_dir=str(tmp_path))
    assert [(e.line, e.code, e.message) for e in report.errors] == [
        (DEFAULT_BUFFER + 8, "duplicate_custom_id",
         "The custom_id for this request is a duplicate of another request."),
        (n, "duplicate_custom_id",
         "The custom_id for this request is a duplicate of another request.")]
    assert report.total == n and list(tmp_path.iterdir()) == []
    assert before == (open_fds() if before else 0)

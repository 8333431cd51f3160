"""Finding repeated `custom_id`s in memory that does not grow with the number of lines.

`DuplicateFinder` takes the `custom_id` of every request, in line order, and answers which
lines repeat one that came before. It holds a fixed number of records: past that, it sorts
what it holds and writes it to a temporary file (a run), and merges the runs at the end,
a fixed number at a time. Three such sorts, each over less than the one before:

1. `(hash, line)` of every request (16 bytes each, sorted with numpy) by hash. A request
   whose hash no other shares cannot repeat; the others are the suspects.
2. The suspects by line, so that one more pass over the input reads their real
   `custom_id`s (only when the input can be read again, and only if there are suspects).
3. `(hash, custom_id, line)` of the suspects, sorted: in a group of equal hash and
   `custom_id`, every line after the first repeats it. Two different `custom_id`s that
   hash alike are told apart here, so the answer is exact. Without a second pass over the
   input, the hash stands in for the `custom_id`.

Temporary files are anonymous (`tempfile.TemporaryFile`: on POSIX, unlinked at once), so
none outlives its process, even one killed; `close` (or leaving the `with` block) closes
them early, also on an error or a cancel. A batch under the buffer size never writes one.
"""

from __future__ import annotations

import heapq
import os
import pickle
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

#: Rows of `(hash, line)` or `(line, hash)` as they are sorted and spilled, int64: the first
#: column is the key.
Records = np.ndarray[Any, np.dtype[np.int64]]
_RECORD_BYTES = 16

#: Records buffered before a sorted run goes to disk: 16 bytes each, 4 MiB in all (about
#: three times that at the peak, while a run is sorted, or merged).
DEFAULT_BUFFER = 1 << 18
#: Runs merged at once; more runs are first merged into fewer, longer ones.
DEFAULT_FAN_IN = 64
#: Suspects buffered before a run goes to disk, as (an estimate of) their bytes in memory.
_SUSPECT_BUDGET = 8 << 20
#: What a buffered suspect costs besides its `custom_id`: the tuple and its two ints.
_SUSPECT_OVERHEAD = 160


@dataclass(frozen=True)
class Duplicates:
    """How many lines repeat an earlier line's `custom_id`, and the first of them (sorted,
    at most the `limit` asked for)."""

    count: int
    lines: list[int]


class _Spill:
    """The temporary files of one finder: created on demand, all closed by `close`."""

    def __init__(self, tmp_dir: str | None) -> None:
        self.tmp_dir = tmp_dir
        self.open: list[IO[bytes]] = []
        self.runs = 0

    def new(self) -> IO[bytes]:
        file = tempfile.TemporaryFile(dir=self.tmp_dir)  # noqa: SIM115 (closed by `done`)
        self.open.append(file)
        return file

    def done(self, file: IO[bytes]) -> None:
        file.close()
        self.open.remove(file)

    def close(self) -> None:
        for file in self.open:
            file.close()
        self.open.clear()


class _RunFile:
    """Sorted runs, one after another in one temporary file (one descriptor, however many
    runs), each known by its `(offset, size)`."""

    def __init__(self, spill: _Spill) -> None:
        self._spill = spill
        self._file: IO[bytes] | None = None
        self.spans: list[tuple[int, int]] = []

    def append(self, pieces: Iterable[bytes | memoryview]) -> None:
        """Write one run (each piece in turn) at the end of the file."""
        if self._file is None:
            self._file = self._spill.new()
        file = self._file
        start = file.seek(0, os.SEEK_END)
        for piece in pieces:
            file.write(piece)
        self.spans.append((start, file.tell() - start))
        self._spill.runs += 1

    def read(self, offset: int, size: int) -> bytes:
        assert self._file is not None
        self._file.seek(offset)
        return self._file.read(size)

    def unpickle(self, offset: int) -> tuple[Any, int]:
        """The object pickled at `offset`, and the offset after it."""
        assert self._file is not None
        self._file.seek(offset)
        found = pickle.load(self._file)  # our own temporary file, written by `append`
        return found, self._file.tell()

    def close(self) -> None:
        if self._file is not None:
            self._spill.done(self._file)
            self._file = None


class _RecordSort:
    """An external sort of int64 `(key, value)` pairs by key, with numpy.

    Equal keys come out next to each other; their order among themselves is not kept."""

    def __init__(self, spill: _Spill, capacity: int, fan_in: int) -> None:
        self._spill = spill
        self._capacity = capacity
        self._fan_in = fan_in
        self._keys, self._values = array("q"), array("q")
        self._runs = _RunFile(spill)

    def add(self, key: int, value: int) -> None:
        self._keys.append(key)
        self._values.append(value)
        if len(self._keys) >= self._capacity:
            self._runs.append([_as_bytes(self._take_sorted())])

    def add_block(self, keys: np.ndarray[Any, Any], values: np.ndarray[Any, Any]) -> None:
        self._keys.frombytes(np.ascontiguousarray(keys, dtype=np.int64).tobytes())
        self._values.frombytes(np.ascontiguousarray(values, dtype=np.int64).tobytes())
        if len(self._keys) >= self._capacity:
            self._runs.append([_as_bytes(self._take_sorted())])

    def _take_sorted(self) -> Records:
        keys = np.frombuffer(self._keys, dtype=np.int64)
        values = np.frombuffer(self._values, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        records = np.empty((len(keys), 2), dtype=np.int64)
        records[:, 0] = keys[order]
        records[:, 1] = values[order]
        del keys, values, order
        self._keys, self._values = array("q"), array("q")  # the old buffers go now
        return records

    def sorted_blocks(self) -> Iterator[Records]:
        """The pairs in key order, a block at a time; the sort takes no more input."""
        runs = self._runs
        if not runs.spans:
            records = self._take_sorted()
            if len(records):
                yield records
            return
        if len(self._keys):
            runs.append([_as_bytes(self._take_sorted())])
        block = max(1, self._capacity // self._fan_in)  # the merge holds one buffer's worth
        while len(runs.spans) > self._fan_in:  # merge passes, into a new file each
            merged = _RunFile(self._spill)
            for start in range(0, len(runs.spans), self._fan_in):
                group = runs.spans[start:start + self._fan_in]
                merged.append(_as_bytes(records) for records in _merge_runs(runs, group, block))
            runs.close()
            runs = self._runs = merged
        yield from _merge_runs(runs, runs.spans, block)
        runs.close()


def _as_bytes(records: Records) -> memoryview:
    return np.ascontiguousarray(records).data.cast("B")


def _read_run(runs: _RunFile, span: tuple[int, int], block: int) -> Iterator[Records]:
    offset, left = span
    while left:
        data = runs.read(offset, min(left, block * _RECORD_BYTES))
        offset, left = offset + len(data), left - len(data)
        yield np.frombuffer(data, dtype=np.int64).reshape(-1, 2)


def _merge_runs(runs: _RunFile, spans: list[tuple[int, int]], block: int) -> Iterator[Records]:
    """Runs sorted by key merged into one sequence of blocks sorted by key, holding at most
    `block` records of each run. Each round takes, from every run, what is at or below the
    smallest last key any run has in memory: nothing left behind can sort before it."""
    readers = [_read_run(runs, span, block) for span in spans]
    heads: list[Records | None] = [next(reader, None) for reader in readers]
    while True:
        live = [i for i, head in enumerate(heads) if head is not None]
        if not live:
            return
        cutoff = min(int(heads[i][-1, 0]) for i in live)  # type: ignore[index]
        parts = []
        for i in live:
            head = heads[i]
            assert head is not None
            cut = int(np.searchsorted(head[:, 0], cutoff, side="right"))
            if cut:
                parts.append(head[:cut])
            heads[i] = head[cut:] if cut < len(head) else next(readers[i], None)
        out = np.concatenate(parts)
        yield out[np.argsort(out[:, 0], kind="stable")] if len(parts) > 1 else out


def _shared_keys(blocks: Iterable[Records]) -> Iterator[Records]:
    """The records whose key another record shares, from blocks in key order."""
    held: Records | None = None  # the last record so far: its right neighbour is not known
    held_shared = False
    for block in blocks:
        both = block if held is None else np.concatenate([held, block])
        keys = both[:, 0]
        same = keys[1:] == keys[:-1]
        shared = np.zeros(len(both), dtype=bool)
        shared[1:] |= same
        shared[:-1] |= same
        if held is not None:
            shared[0] |= held_shared
        found = both[:-1][shared[:-1]]
        if len(found):
            yield found
        held, held_shared = both[-1:].copy(), bool(shared[-1])
    if held is not None and held_shared:
        yield held


class _SuspectSort:
    """An external sort of `(hash, custom_id, line)` tuples, in pickled runs."""

    def __init__(self, spill: _Spill, budget: int, fan_in: int) -> None:
        self._spill = spill
        self._budget = budget
        self._fan_in = fan_in
        self._items: list[tuple[int, str, int]] = []
        self._bytes = 0
        self._runs = _RunFile(spill)
        # Suspects per pickle in a run: the merge holds one of each run, a budget's worth.
        self._pickle_block = max(1, budget // (fan_in * _SUSPECT_OVERHEAD))

    def add(self, item: tuple[int, str, int]) -> None:
        self._items.append(item)
        self._bytes += _SUSPECT_OVERHEAD + len(item[1])
        if self._bytes >= self._budget:
            self._runs.append(self._pickled(self._sorted_items()))

    def _sorted_items(self) -> list[tuple[int, str, int]]:
        items, self._items, self._bytes = self._items, [], 0
        items.sort()
        return items

    def _pickled(self, items: Iterable[tuple[int, str, int]]) -> Iterator[bytes]:
        block: list[tuple[int, str, int]] = []
        for item in items:
            block.append(item)
            if len(block) == self._pickle_block:
                yield pickle.dumps(block, protocol=pickle.HIGHEST_PROTOCOL)
                block = []
        if block:
            yield pickle.dumps(block, protocol=pickle.HIGHEST_PROTOCOL)

    def sorted_items(self) -> Iterator[tuple[int, str, int]]:
        runs = self._runs
        if not runs.spans:
            yield from self._sorted_items()
            return
        if self._items:
            runs.append(self._pickled(self._sorted_items()))
        while len(runs.spans) > self._fan_in:  # merge passes, into a new file each
            merged = _RunFile(self._spill)
            for start in range(0, len(runs.spans), self._fan_in):
                group = runs.spans[start:start + self._fan_in]
                merged.append(self._pickled(
                    heapq.merge(*(_unpickled(runs, span) for span in group))))
            runs.close()
            runs = self._runs = merged
        yield from heapq.merge(*(_unpickled(runs, span) for span in runs.spans))
        runs.close()


def _unpickled(runs: _RunFile, span: tuple[int, int]) -> Iterator[tuple[int, str, int]]:
    offset, end = span[0], span[0] + span[1]
    while offset < end:
        block, offset = runs.unpickle(offset)
        yield from block


class DuplicateFinder:
    """Lines whose `custom_id` repeats an earlier line's, in bounded memory.

    `add` every request's line number (increasing) and `custom_id`, then ask `duplicates`
    once. `hash_fn` maps a `custom_id` to a signed 64-bit int (Python's `hash` by default,
    stable within a process); `buffer_size` records (16 bytes each) are held before a run
    is written to a temporary file in `tmp_dir` (the system's by default)."""

    def __init__(self, *, hash_fn: Callable[[str], int] = hash,
                 buffer_size: int = DEFAULT_BUFFER, fan_in: int = DEFAULT_FAN_IN,
                 suspect_budget: int = _SUSPECT_BUDGET, tmp_dir: str | None = None) -> None:
        if buffer_size < 2 or fan_in < 2:
            raise ValueError("buffer_size and fan_in must be at least 2")
        self._hash = hash_fn
        self._buffer_size = buffer_size
        self._fan_in = fan_in
        self._suspect_budget = suspect_budget
        self._spill = _Spill(tmp_dir)
        self._by_hash = _RecordSort(self._spill, buffer_size, fan_in)

    def __enter__(self) -> DuplicateFinder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close (and so remove) every temporary file still open."""
        self._spill.close()

    @property
    def runs_written(self) -> int:
        """Sorted runs written to temporary files so far (0 while all fits in the buffer)."""
        return self._spill.runs

    def add(self, line: int, custom_id: str) -> None:
        self._by_hash.add(self._hash(custom_id), line)

    def add_many(self, lines: Sequence[int], custom_ids: Sequence[str]) -> None:
        """`add` for many requests at once, in line order: the same records, for less
        work a request."""
        hash_fn = self._hash
        self._by_hash.add_block(np.array([hash_fn(c) for c in custom_ids], dtype=np.int64),
                                np.array(lines, dtype=np.int64))

    def duplicates(self, *, limit: int, reread: Callable[[], Iterable[bytes]] | None = None,
                   key_of: Callable[[bytes], str] | None = None) -> Duplicates:
        """Count the lines that repeat an earlier `custom_id`, and list the first `limit`.

        `reread` yields the input's lines again (line 1 first), and `key_of` reads a line's
        `custom_id`: then only equal `custom_id`s count. Without them, equal hashes do."""
        try:
            suspects = _SuspectSort(self._spill, self._suspect_budget, self._fan_in)
            blocks = _shared_keys(self._by_hash.sorted_blocks())
            if reread is None or key_of is None:
                for block in blocks:
                    for digest, line in zip(block[:, 0].tolist(), block[:, 1].tolist(),
                                            strict=True):
                        suspects.add((digest, "", line))
            else:
                by_line = _RecordSort(self._spill, self._buffer_size, self._fan_in)
                for block in blocks:
                    by_line.add_block(block[:, 1], block[:, 0])
                _read_suspects(by_line.sorted_blocks(), reread, key_of, suspects)
            return _repeats(suspects.sorted_items(), limit)
        finally:
            self.close()


def _read_suspects(by_line: Iterator[Records], reread: Callable[[], Iterable[bytes]],
                   key_of: Callable[[bytes], str], suspects: _SuspectSort) -> None:
    """One pass over the input for the real `custom_id` of each suspect line."""
    wanted = _flatten(by_line)
    next_wanted = next(wanted, None)
    if next_wanted is None:
        return
    for line, raw in enumerate(reread(), start=1):
        if line < next_wanted[0]:
            continue
        suspects.add((next_wanted[1], key_of(raw), line))
        next_wanted = next(wanted, None)
        if next_wanted is None:
            return


def _flatten(blocks: Iterator[Records]) -> Iterator[tuple[int, int]]:
    for block in blocks:
        yield from zip(block[:, 0].tolist(), block[:, 1].tolist(), strict=True)


def _repeats(items: Iterator[tuple[int, str, int]], limit: int) -> Duplicates:
    """From `(hash, custom_id, line)` in order: every line after the first of its group."""
    count = 0
    first: list[int] = []  # the smallest `limit` lines, as a max-heap of negated lines
    previous: tuple[int, str] | None = None
    for digest, custom_id, line in items:
        if previous == (digest, custom_id):
            count += 1
            if len(first) < limit:
                heapq.heappush(first, -line)
            elif limit and -first[0] > line:
                heapq.heapreplace(first, -line)
        else:
            previous = (digest, custom_id)
    return Duplicates(count=count, lines=sorted(-line for line in first))

"""(extension) Cursors of results read while a batch or a job runs, and reading result
lines from a byte offset.

A cursor says how far a reader got: in which source it is (a stage), where in that source
(a byte offset into a file, or a unit of work and the lines of it already read), and how
many output and error lines it has read in all. The counts are what lets a reader who
started while the work ran carry on once it has ended: the final files hold the same lines
in the same order, so the lines not read yet start after those counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import IO

from batchery.model.exceptions import InvalidRequest

#: The most result lines one page may hold, and how many it holds unless asked.
MAX_PAGE_LINES = 10_000
DEFAULT_PAGE_LINES = 1000
#: `at` when the byte offset of a stage is not known yet (it is found by counting lines).
UNKNOWN = -1


@dataclass(frozen=True, slots=True)
class ResultsCursor:
    #: Which source the reader is in; each reader defines its stages, in order.
    stage: str
    #: A byte offset into the stage's file (or UNKNOWN), or the id of the unit of work
    #: (a part, a chunk, a job batch) to read next.
    at: int = 0
    #: Lines of unit `at` already read.
    skip: int = 0
    #: Output (or result) lines read in all.
    out: int = 0
    #: Error lines read in all.
    err: int = 0

    def encode(self) -> str:
        return f"{self.stage}.{self.at}.{self.skip}.{self.out}.{self.err}"

    @classmethod
    def decode(cls, text: str | None, stages: tuple[str, ...]) -> ResultsCursor:
        """The cursor `text` (None: the start); a 400 naming `after` if this route did not
        give it."""
        if text is None:
            return cls(stages[0])
        if re.fullmatch(cursor_pattern(stages), text) is None:
            raise _bad_cursor()
        stage, at, skip, out, err = text.split(".")
        return cls(stage, int(at), int(skip), int(out), int(err))


def cursor_pattern(stages: tuple[str, ...]) -> str:
    """What a cursor of a route with these stages looks like: its stage, where in it, the
    lines of the unit already read, and the output and error lines read in all. Every
    string it matches is a cursor the route reads (at worst, past the end)."""
    number = "[0-9]{1,18}"
    return rf"^({'|'.join(stages)})\.(-1|{number})\.{number}\.{number}\.{number}$"


@dataclass(frozen=True, slots=True)
class ResultsPage:
    lines: list[bytes]
    cursor: ResultsCursor
    #: More lines could be read now: the page stopped at its limit.
    has_more: bool
    #: The work has ended and the cursor is at the end of its results: none will come.
    final: bool


def _bad_cursor() -> InvalidRequest:
    return InvalidRequest("Invalid value for 'after': expected a cursor this route returned "
                          "(the Batchery-Next-Cursor header of an earlier page).",
                          param="after", code="invalid_value")


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_LINES:
        raise InvalidRequest(f"'limit' must be between 1 and {MAX_PAGE_LINES}.",
                             param="limit", code="invalid_value")
    return limit


@dataclass(frozen=True, slots=True)
class Lines:
    """Lines read from a file: each LF-terminated, where reading stopped, and whether
    that is the end of the file."""

    lines: list[bytes]
    end: int
    eof: bool


def lines_from(stream: IO[bytes], start: int, limit: int) -> Lines:
    """Up to `limit` non-blank lines of `stream` from byte `start` (a line's start)."""
    stream.seek(start)
    found: list[bytes] = []
    at = start
    while len(found) < limit:
        raw = stream.readline()
        if not raw:
            return Lines(found, at, True)
        at += len(raw)
        if raw.strip():
            found.append(raw if raw.endswith(b"\n") else raw + b"\n")
    # Whether anything but blank lines follows, without moving past it.
    while raw := stream.readline():
        if raw.strip():
            return Lines(found, at, False)
        at += len(raw)
    return Lines(found, at, True)


def offset_after(stream: IO[bytes], count: int) -> int:
    """Where the line after the first `count` non-blank lines of `stream` starts (its end
    when it has fewer)."""
    stream.seek(0)
    at = seen = 0
    while seen < count:
        raw = stream.readline()
        if not raw:
            break
        at += len(raw)
        seen += bool(raw.strip())
    return at


def split_lines(data: bytes) -> list[bytes]:
    """The non-blank lines of `data`, each LF-terminated."""
    return [line + b"\n" for line in data.split(b"\n") if line.strip()]

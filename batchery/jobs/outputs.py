"""Where a job's results go: a directory per job under its `output_path` (a local
directory or any fsspec URL), written so that no reader ever sees half a file."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import orjson

from batchery.model.exceptions import Conflict

RESULTS_NAME = "results.jsonl"
DEAD_LETTERS_NAME = "failed_batches.jsonl"


def job_dir(base: str, job_id: str) -> str:
    """Each job writes under its own directory, so no job overwrites another's output."""
    return f"{base.rstrip('/')}/{job_id}"


def _fs(url: str) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def write_atomically(url: str, chunks: Iterable[bytes]) -> int:
    """Write `chunks` to `url` under a temporary name, then move it into place."""
    fs, path = _fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    partial = f"{path}.partial"
    size = 0
    with fs.open(partial, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
    fs.mv(partial, path)
    return size


def read(url: str, block: int = 1 << 20) -> Iterator[bytes]:
    fs, path = _fs(url)
    with fs.open(path, "rb") as stream:
        while data := stream.read(block):
            yield data


def dead_letter_items(url: str, most: int) -> list[Any]:
    """(extension) The items of a job's dead letters, in order, from its dead-letters file
    (`DEAD_LETTERS_NAME`), for a retry; at most `most`."""
    found: list[Any] = []
    try:
        for line in b"".join(read(url)).splitlines():
            if line.strip():
                found += orjson.loads(line)["items"]
    except FileNotFoundError:
        raise Conflict(f"The dead letters' items of this job are gone ({url} was deleted), "
                       f"so they cannot be rerun.") from None
    if len(found) > most:
        raise Conflict(f"The dead letters hold {len(found)} items, more than the {most} a "
                       f"retry can carry; submit them as a new job from {url}.")
    return found

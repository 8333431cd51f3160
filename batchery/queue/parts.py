"""Part files: what a unit of work writes before its commit names them.

A part is written whole under a key no other lease can produce (the lease's token is in
it), then named by a fenced commit. A worker that loses its lease before the commit deletes
its part; one that dies leaves an orphan that no record names, which goes when its batch or
job's prefix is cleaned up at the end. Readers only ever follow committed records, so a
half-written part is never seen.
"""

from __future__ import annotations

from batchery.ports.filestore import FileStore


def part_key(prefix: str, index: int, token: str, seq: int, suffix: str) -> str:
    """The key of part `seq` of work `index`, written under the lease `token`."""
    return f"{prefix}/{index:09d}-{token}-{seq:05d}{suffix}"


def write_part(files: FileStore, key: str, data: bytes | bytearray) -> str | None:
    """Write `data` whole; returns the key, or None (and nothing written) when empty."""
    if not data:
        return None
    with files.open_write(key) as out:
        out.write(data)
    return key


def drop_parts(files: FileStore, *keys: str | None) -> None:
    """Delete parts whose commit failed (the lease was lost)."""
    for key in keys:
        if key:
            files.delete(key)

"""Job inputs on any fsspec file system: listing files with glob filters, and streaming
the records of delimited files (NDJSON, CSV/TSV, Parquet) without ever holding a whole
file in memory."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import orjson

from batchery.exceptions import BatcheryError, InvalidRequest

_NDJSON = (".jsonl", ".ndjson", ".json")
_CSV = {".csv": ",", ".tsv": "\t"}
_PARQUET = (".parquet", ".pq")
SUPPORTED = (*_NDJSON, *_CSV, *_PARQUET)
_GLOB_CHARS = re.compile(r"[*?\[]")


class RecordError(BatcheryError):
    """A record of a delimited file cannot be read."""

    def __init__(self, url: str, where: str, message: str) -> None:
        super().__init__(f"{url.rsplit('/', 1)[-1]} {where}: {message}")
        self.url, self.where = url, where


@dataclass(frozen=True, kw_only=True, slots=True)
class FileSelection:
    paths: tuple[str, ...]
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()


def compile_glob(pattern: str, param: str) -> re.Pattern[str]:
    """`*` and `?` stay within a path segment, `**` crosses `/` (`**/` may match no
    directory at all), `[...]` and `[!...]` are character classes."""
    if not pattern:
        raise InvalidRequest("A glob must not be empty.", param=param)
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if end < 0:
                raise InvalidRequest(f"The glob '{pattern}' opens a '[' class that is never "
                                     f"closed.", param=param)
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = end + 1
        else:
            out.append(re.escape(char))
            i += 1
    try:
        return re.compile("".join(out) + r"\Z")
    except re.error as exc:
        raise InvalidRequest(f"The glob '{pattern}' is not valid: {exc}.", param=param) from None


def list_files(selection: FileSelection, *, param: str) -> list[str]:
    """Every matched file as a URL a worker can open, sorted and de-duplicated."""
    includes = [compile_glob(g, f"{param}.includes[{i}]")
                for i, g in enumerate(selection.includes)]
    excludes = [compile_glob(g, f"{param}.excludes[{i}]")
                for i, g in enumerate(selection.excludes)]
    found: set[str] = set()
    for path in selection.paths:
        for url, relative in _expand(path, f"{param}.paths"):
            if includes and not any(g.match(relative) for g in includes):
                continue
            if any(g.match(relative) for g in excludes):
                continue
            found.add(url)
    if not found:
        raise InvalidRequest(f"No file matched {list(selection.paths)} with includes "
                             f"{list(selection.includes)} and excludes "
                             f"{list(selection.excludes)}.", param=f"{param}.paths")
    return sorted(found)


def _expand(path: str, param: str) -> Iterator[tuple[str, str]]:
    """(url, path relative to the listed root) for each file under `path`."""
    try:
        fs, root = fsspec.core.url_to_fs(path)
        protocol = _protocol(fs)
        wildcard = _GLOB_CHARS.search(root)
        if wildcard:
            base = root[:wildcard.start()].rsplit("/", 1)[0]
            names = [n for n in fs.glob(root) if fs.isfile(n)]
        elif fs.isfile(root):
            base, names = root.rsplit("/", 1)[0], [root]
        elif fs.isdir(root):
            base, names = root.rstrip("/"), list(fs.find(root))
        else:  # a prefix, as in s3://bucket/images/img
            base = root.rsplit("/", 1)[0]
            names = [n for n in fs.find(base) if n.startswith(root)] if base else []
    except Exception as exc:
        # Any failure to list is about the caller's path; s3fs and friends raise their
        # own types (a missing credential, say).
        raise InvalidRequest(f"Cannot list '{path}': {type(exc).__name__}: {exc}",
                             param=param) from None
    for name in names:
        relative = name[len(base):].lstrip("/") if base and name.startswith(base) else name
        yield _url(protocol, name), relative


def _protocol(fs: Any) -> str:
    protocol = fs.protocol
    name = protocol[0] if isinstance(protocol, tuple | list) else protocol
    return str(name)


def _url(protocol: str, name: str) -> str:
    if protocol in ("file", "local"):
        return name if name.startswith("/") else "/" + name
    return f"{protocol}://{name}"


def _suffix(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    return name[name.rfind("."):] if "." in name else ""


def check_delimited(urls: Sequence[str], *, param: str) -> None:
    for url in urls:
        if _suffix(url) not in SUPPORTED:
            raise InvalidRequest(f"'{url}' is not a delimited file Batchery can read "
                                 f"(supported: {', '.join(SUPPORTED)}).",
                                 param=f"{param}.paths")


def iter_records(url: str, *, batch_rows: int = 4096) -> Iterator[Any]:
    suffix = _suffix(url)
    if suffix in _NDJSON:
        yield from _ndjson(url)
    elif suffix in _CSV:
        yield from _csv(url, _CSV[suffix])
    elif suffix in _PARQUET:
        yield from _parquet(url, batch_rows)
    else:
        raise RecordError(url, "", f"unsupported file type (supported: {', '.join(SUPPORTED)})")


def _ndjson(url: str) -> Iterator[Any]:
    with fsspec.open(url, "rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise RecordError(url, f"line {number}", f"not valid JSON: {exc}") from None


def _csv(url: str, delimiter: str) -> Iterator[Any]:
    from pyarrow import csv

    with fsspec.open(url, "rb") as stream:
        reader = csv.open_csv(stream, parse_options=csv.ParseOptions(delimiter=delimiter))
        for batch in reader:
            yield from batch.to_pylist()


def _parquet(url: str, batch_rows: int) -> Iterator[Any]:
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as stream:
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()


def count_records(url: str) -> int:
    suffix = _suffix(url)
    if suffix in _PARQUET:
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb") as stream:
            return int(pq.ParquetFile(stream).metadata.num_rows)
    if suffix in _NDJSON:
        with fsspec.open(url, "rb") as stream:
            return sum(1 for line in stream if line.strip())
    return sum(1 for _ in iter_records(url))

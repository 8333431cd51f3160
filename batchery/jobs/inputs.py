"""Job inputs on any fsspec file system: listing files with glob filters, and streaming
the records of delimited files (NDJSON, CSV/TSV, Parquet) without ever holding a whole
file in memory.

A file to read is a `Source`: a URL and the format of its records. Listed files take
their format from their name; a project's uploaded files (given by id) from the name
they were uploaded with, as their blob in the file store has none."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import orjson

from batchery.model.exceptions import BatcheryError, InvalidRequest
from batchery.model.files import INTERNAL_PURPOSE_PREFIX, FileRecord

_NDJSON = (".jsonl", ".ndjson", ".json")
_CSV = {".csv": ",", ".tsv": "\t"}
_PARQUET = (".parquet", ".pq")
SUPPORTED = (*_NDJSON, *_CSV, *_PARQUET)
_GLOB_CHARS = re.compile(r"[*?\[]")
LOCAL_PROTOCOLS = ("file", "local")


class RecordError(BatcheryError):
    """A record of a delimited file cannot be read."""

    def __init__(self, name: str, where: str, message: str) -> None:
        super().__init__(f"{name} {where}: {message}" if where else f"{name}: {message}")
        self.name, self.where = name, where


class SourceUnavailable(OSError):
    """A remote file could not be listed or read. Says which and the exception's type,
    never the text: that may be what a server answered. An OSError, so that the worker
    tries again."""


def is_local(url: str) -> bool:
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol is None or protocol in LOCAL_PROTOCOLS


@dataclass(frozen=True, kw_only=True, slots=True)
class Source:
    """A file whose records (or whose URL, for `file_path_lister`) a job reads."""

    url: str
    #: The record format, as a file name suffix (`.csv`); '' when the name has none.
    format: str
    #: How messages name it: the URL, or the file id and the name it was uploaded with.
    label: str
    #: The field of the job's input it came from: `paths` or `file_ids`.
    origin: str = "paths"
    file_id: str | None = None

    @property
    def shown(self) -> str:
        """What a dry run lists: the URL of a listed file, the id of an uploaded one."""
        return self.file_id or self.url

    @classmethod
    def of(cls, url: str) -> Source:
        return cls(url=url, format=_suffix(url), label=url)

    @property
    def local(self) -> bool:
        return is_local(self.url)


def _source(source: str | Source) -> Source:
    return source if isinstance(source, Source) else Source.of(source)


@dataclass(frozen=True, kw_only=True, slots=True)
class FileSelection:
    paths: tuple[str, ...]
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()


class Guard(Protocol):
    """What a listing may look at (a shared server's sandbox)."""

    def may_list(self, url: str) -> bool:
        """Whether the listing may look under `url` (a directory or prefix)."""

    def check_found(self, url: str, param: str) -> None:
        """Raise InvalidRequest for a found file the job may not read."""


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


def glob_base(path: str) -> tuple[str, str] | None:
    """(the part before the segment holding the first glob character, the rest), or
    None when `path` has no glob character."""
    wildcard = _GLOB_CHARS.search(path)
    if wildcard is None:
        return None
    cut = path.rfind("/", 0, wildcard.start())
    return (path[:cut], path[cut + 1:]) if cut >= 0 else ("", path)


def list_files(selection: FileSelection, *, param: str, guard: Guard | None = None) -> list[str]:
    """Every matched file as a URL a worker can open, sorted and de-duplicated. With a
    `guard`, nothing is listed under a place it refuses, and every match is checked
    before it is returned."""
    includes = [compile_glob(g, f"{param}.includes[{i}]")
                for i, g in enumerate(selection.includes)]
    excludes = [compile_glob(g, f"{param}.excludes[{i}]")
                for i, g in enumerate(selection.excludes)]
    found: set[str] = set()
    for path in selection.paths:
        for url, relative in _expand(path, f"{param}.paths", guard):
            if includes and not any(g.match(relative) for g in includes):
                continue
            if any(g.match(relative) for g in excludes):
                continue
            if guard is not None:
                guard.check_found(url, f"{param}.paths")
            found.add(url)
    if not found:
        raise InvalidRequest(f"No file matched {list(selection.paths)} with includes "
                             f"{list(selection.includes)} and excludes "
                             f"{list(selection.excludes)}.", param=f"{param}.paths")
    return sorted(found)


def _expand(path: str, param: str, guard: Guard | None) -> Iterator[tuple[str, str]]:
    """(url, path relative to the listed root) for each file under `path`."""
    try:
        fs, root = fsspec.core.url_to_fs(path)
        protocol = _protocol(fs)
        base, names = _names(fs, protocol, root, guard)
    except Exception as exc:
        # Any failure to list is about the caller's path; s3fs and friends raise their
        # own types (a missing credential, say). A remote store's words stay out of the
        # answer: they may come from a server the caller should not learn about.
        detail = f": {exc}" if is_local(path) else ""
        raise InvalidRequest(f"Cannot list '{path}': {type(exc).__name__}{detail}",
                             param=param) from None
    for name in names:
        relative = name[len(base):].lstrip("/") if base and name.startswith(base) else name
        yield _url(protocol, name), relative


def _names(fs: Any, protocol: str, root: str, guard: Guard | None) -> tuple[str, list[str]]:
    def may_list(where: str) -> bool:
        return guard is None or guard.may_list(_url(protocol, where))

    globbed = glob_base(root)
    if globbed is not None:
        base = globbed[0]
        return base, [n for n in fs.glob(root) if fs.isfile(n)] if may_list(base) else []
    if fs.isfile(root):
        return root.rsplit("/", 1)[0], [root]
    if fs.isdir(root):
        return root.rstrip("/"), list(fs.find(root)) if may_list(root) else []
    # A prefix, as in s3://bucket/images/img: its parent is listed.
    base = root.rsplit("/", 1)[0]
    if not base or not may_list(base):
        return base, []
    return base, [n for n in fs.find(base) if n.startswith(root)]


def _protocol(fs: Any) -> str:
    protocol = fs.protocol
    name = protocol[0] if isinstance(protocol, tuple | list) else protocol
    return str(name)


def _url(protocol: str, name: str) -> str:
    if protocol in LOCAL_PROTOCOLS:
        return name if name.startswith("/") else "/" + name
    return f"{protocol}://{name}"


def blob_url(store_url: str, key: str) -> str:
    """The URL of the blob at `key` of the file store at `store_url`, as a worker or a
    predictor opens it (a plain path for a local store)."""
    fs, root = fsspec.core.url_to_fs(store_url)
    return _url(_protocol(fs), f"{root.rstrip('/')}/{key}")


def _suffix(name: str) -> str:
    name = name.rsplit("/", 1)[-1].lower()
    return name[name.rfind("."):] if "." in name else ""


def uploaded(record: FileRecord | None, file_id: str, url: Callable[[str], str], *,
             param: str, now: float) -> Source:
    """The source of an uploaded file given by id. `record` is the project's file of that
    id, if any: an unknown id and another project's id get the same answer."""
    if record is None or record.purpose.startswith(INTERNAL_PURPOSE_PREFIX) \
            or (record.expires_at is not None and record.expires_at <= now):
        raise InvalidRequest(f"No uploaded file found with id '{file_id}'.",
                             param=f"{param}.file_ids")
    return Source(url=url(record.storage_key), format=_suffix(record.filename),
                  label=f"{file_id} ({record.filename})", origin="file_ids",
                  file_id=file_id)


def check_delimited(sources: Sequence[str | Source], *, param: str) -> None:
    for source in map(_source, sources):
        if source.format not in SUPPORTED:
            raise InvalidRequest(f"'{source.label}' is not a delimited file Batchery can read "
                                 f"(supported: {', '.join(SUPPORTED)}).",
                                 param=f"{param}.{source.origin}")


def iter_records(source: str | Source, *, batch_rows: int = 4096) -> Iterator[Any]:
    source = _source(source)
    if source.format in _NDJSON:
        records = _ndjson(source)
    elif is_columnar(source):
        records = (row for batch in _batches(source, batch_rows) for row in batch.to_pylist())
    else:
        raise RecordError(source.label, "", f"unsupported file type (supported: "
                                            f"{', '.join(SUPPORTED)})")
    yield from _guarded(source, records)


def is_columnar(source: str | Source) -> bool:
    """Whether the file is read by pyarrow (CSV, TSV, Parquet), as record batches."""
    return _source(source).format in (*_CSV, *_PARQUET)


def iter_batches(source: str | Source, *, batch_rows: int = 16384) -> Iterator[Any]:
    """The records of a CSV, TSV or Parquet file as pyarrow record batches: the rows,
    with the types pyarrow inferred, that `iter_records` turns into dicts."""
    source = _source(source)
    if not is_columnar(source):
        raise RecordError(source.label, "", "not a CSV, TSV or Parquet file")
    yield from _guarded(source, _batches(source, batch_rows))


#: Field metadata of a column that `jsonable` turned into JSON texts.
JSON_COLUMN = b"batchery.json"


def jsonable(batch: Any, source: str | Source) -> Any:
    """`batch` (a record batch of `source`) with each column as its rows' values come out
    of a JSON round trip (`orjson`, `default=str`): columns whose values JSON keeps as
    they are (integers, booleans, strings, nulls) stay; floats lose NaN and infinities
    (JSON has them as null); every other column (dates, timestamps, decimals, binary,
    lists, structs) becomes one JSON text per row, marked `JSON_COLUMN`. So `to_items`
    gives the items a JSON line per row would have given. No schema metadata is kept."""
    import pyarrow as pa

    try:
        fields, arrays = [], []
        for field, column in zip(batch.schema, batch.columns, strict=True):
            kind = field.type
            if _json_native(kind):
                field = field.remove_metadata()
            elif pa.types.is_float32(kind) or pa.types.is_float64(kind):
                field, column = field.remove_metadata(), _finite(column)
            else:
                column = pa.array([dump(value) for value in column.to_pylist()], pa.binary())
                field = pa.field(field.name, pa.binary(), metadata={JSON_COLUMN: b"1"})
            fields.append(field)
            arrays.append(column)
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
    except Exception as exc:
        raise _read_error(_source(source), exc) from None


def to_items(table: Any) -> list[Any]:
    """The items of a table (or record batch) of `jsonable` columns: a dict per row."""
    json_columns = [(field.name, table.column(i)) for i, field in enumerate(table.schema)
                    if field.metadata and field.metadata.get(JSON_COLUMN)]
    items: list[Any] = table.to_pylist()
    for name, column in json_columns:
        for item, text in zip(items, column.to_pylist(), strict=True):
            item[name] = orjson.loads(text)
    return items


def _json_native(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind) or pa.types.is_boolean(kind)
                or pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_null(kind))


def _finite(column: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    finite = pc.is_finite(column)
    if pc.all(finite).as_py() is False:
        return pc.if_else(finite, column, pa.scalar(None, column.type))
    return column


def dump(value: Any) -> bytes:
    """An item as JSON, the way a JSON line of a segment holds it: what JSON cannot hold
    (a date, a decimal) becomes its `str`."""
    return orjson.dumps(value, default=str, option=orjson.OPT_SERIALIZE_NUMPY)


def _guarded(source: Source, values: Iterator[Any]) -> Iterator[Any]:
    """`values`, with a file that is not what its name says turned into a RecordError,
    and a remote failure into SourceUnavailable."""
    try:
        yield from values
    except RecordError:
        raise
    except Exception as exc:
        raise _read_error(source, exc) from None


def _read_error(source: Source, exc: Exception) -> Exception:
    import pyarrow as pa

    if isinstance(exc, pa.ArrowException) and not isinstance(exc, OSError):
        # pyarrow's words are about the bytes it parsed, never about a server.
        return RecordError(source.label, "", f"not a valid {source.format.lstrip('.')} "
                                             f"file: {exc}")
    if source.local:
        return exc
    return SourceUnavailable(f"Cannot read '{source.label}': {type(exc).__name__}")


def _ndjson(source: Source) -> Iterator[Any]:
    with fsspec.open(source.url, "rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise RecordError(source.label, f"line {number}",
                                  f"not valid JSON: {exc}") from None


def _batches(source: Source, batch_rows: int) -> Iterator[Any]:
    if source.format in _CSV:
        return _csv(source, _CSV[source.format])
    return _parquet(source, batch_rows)


def _csv(source: Source, delimiter: str) -> Iterator[Any]:
    from pyarrow import csv

    with fsspec.open(source.url, "rb") as stream:
        yield from csv.open_csv(stream, parse_options=csv.ParseOptions(delimiter=delimiter))


def _parquet(source: Source, batch_rows: int) -> Iterator[Any]:
    import pyarrow.parquet as pq

    with fsspec.open(source.url, "rb") as stream:
        yield from pq.ParquetFile(stream).iter_batches(batch_size=batch_rows)


def _parquet_rows(source: Source) -> Iterator[int]:
    import pyarrow.parquet as pq

    with fsspec.open(source.url, "rb") as stream:
        yield int(pq.ParquetFile(stream).metadata.num_rows)


def count_records(source: str | Source) -> int:
    """How many records the file holds. Every NDJSON line and CSV row is parsed, so that
    a file a worker could not read fails here."""
    source = _source(source)
    if source.format in _PARQUET:
        return sum(_guarded(source, _parquet_rows(source)))
    return sum(1 for _ in iter_records(source))


def count_for_request(source: Source, *, param: str) -> int:
    """`count_records`, with any failure a 400 that names the file and what is wrong."""
    try:
        return count_records(source)
    except (RecordError, SourceUnavailable) as exc:
        message = str(exc)
    except Exception as exc:  # a local file: its own words name the problem
        message = f"Cannot read '{source.label}': {type(exc).__name__}: {exc}"
    raise InvalidRequest(message, param=f"{param}.{source.origin}")

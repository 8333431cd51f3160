"""Job inputs on local files: globs, listing with includes and excludes, and streaming
NDJSON, CSV, TSV and Parquet records; files that cannot be read as 400s naming them;
remote failures that never repeat a server's words; uploaded files given by id."""

from __future__ import annotations

import datetime
import decimal
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.registry import _registry

from batchery.jobs import enqueue, inputs, submission
from batchery.model.exceptions import InvalidRequest
from batchery.model.files import FileRecord
from batchery.model.jobs import InputKind, JobInput


@pytest.mark.parametrize(("pattern", "matches", "misses"), [
    ("**.csv", ["a.csv", "x/y/a.csv"], ["a.csvx", "a.json"]),
    ("*.csv", ["a.csv"], ["x/a.csv"]),
    ("**/x/*.json", ["x/a.json", "p/q/x/b.json"], ["x/y/a.json"]),
    ("a?.txt", ["ab.txt"], ["a/.txt", "abc.txt"]),
    ("[ab]*.txt", ["a1.txt", "b.txt"], ["c.txt"]),
    ("[!ab]*.txt", ["c.txt"], ["a.txt"]),
    ("data+1.csv", ["data+1.csv"], ["dataa1.csv"]),
])
def test_globs(pattern: str, matches: list[str], misses: list[str]) -> None:
    compiled = inputs.compile_glob(pattern, "p")
    assert all(compiled.match(m) for m in matches)
    assert not any(compiled.match(m) for m in misses)


@pytest.mark.parametrize("bad", ["", "[abc", "x/[!"])
def test_bad_globs_name_the_field(bad: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        inputs.compile_glob(bad, "delimited_files.includes[0]")
    assert caught.value.param == "delimited_files.includes[0]"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("a.csv", "b.json", "sub/c.csv", "sub/deep/d.csv", "sub/skip_e.csv",
                 "img_1.jpg", "img_2.jpg"):
        path = tmp_path / "root" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n1\n")
    return tmp_path / "root"


def test_listing_with_includes_and_excludes(tree: Path) -> None:
    select = inputs.FileSelection
    found = inputs.list_files(select(paths=(str(tree),), includes=("**.csv",),
                                     excludes=("**skip_*",)), param="f")
    assert found == [str(tree / n) for n in ("a.csv", "sub/c.csv", "sub/deep/d.csv")]
    assert inputs.list_files(select(paths=(str(tree / "img"),)), param="f") == [
        str(tree / "img_1.jpg"), str(tree / "img_2.jpg")]  # a prefix
    assert inputs.list_files(select(paths=(str(tree / "sub" / "*.csv"),)), param="f") == [
        str(tree / "sub" / "c.csv"), str(tree / "sub" / "skip_e.csv")]  # a glob
    assert inputs.list_files(select(paths=(str(tree / "a.csv"), f"file://{tree}/a.csv")),
                             param="f") == [str(tree / "a.csv")]  # a file, once
    with pytest.raises(InvalidRequest, match="No file matched") as caught:
        inputs.list_files(select(paths=(str(tree),), includes=("**.parquet",)), param="f")
    assert caught.value.param == "f.paths"
    with pytest.raises(InvalidRequest) as bad:
        inputs.list_files(select(paths=(str(tree),), excludes=("ok", "[x")), param="f")
    assert bad.value.param == "f.excludes[1]"


def test_records_of_each_format(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b'{"x": 1}\n\n[2]\n"three"\n')
    (tmp_path / "b.csv").write_text('x,name\n1,"a, b"\n2,"multi\nline"\n')
    (tmp_path / "c.tsv").write_text("x\ty\n1\t2\n")
    pq.write_table(pa.table({
        "day": [datetime.date(2026, 1, 2)], "price": pa.array([decimal.Decimal("1.50")]),
        "n": [3]}), tmp_path / "d.parquet")
    assert list(inputs.iter_records(str(tmp_path / "a.jsonl"))) == [{"x": 1}, [2], "three"]
    assert list(inputs.iter_records(str(tmp_path / "b.csv"))) == [
        {"x": 1, "name": "a, b"}, {"x": 2, "name": "multi\nline"}]
    assert list(inputs.iter_records(str(tmp_path / "c.tsv"))) == [{"x": 1, "y": 2}]
    (row,) = inputs.iter_records(str(tmp_path / "d.parquet"))
    assert orjson.loads(enqueue.dump(row)) == {"day": "2026-01-02", "price": "1.50", "n": 3}
    counts = [inputs.count_records(str(tmp_path / n))
              for n in ("a.jsonl", "b.csv", "c.tsv", "d.parquet")]
    assert counts == [3, 2, 1, 1]


def test_bad_records_and_types(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"ok": 1}\n{"broken": \n')
    with pytest.raises(inputs.RecordError, match=r"bad\.jsonl line 2: not valid JSON"):
        list(inputs.iter_records(str(tmp_path / "bad.jsonl")))
    with pytest.raises(InvalidRequest, match="supported") as caught:
        inputs.check_delimited([str(tmp_path / "x.csv"), str(tmp_path / "y.txt")],
                               param="delimited_files")
    assert caught.value.param == "delimited_files.paths"


def test_records_stream_without_reading_the_whole_file(tmp_path: Path) -> None:
    big = tmp_path / "big.csv"
    with big.open("w") as out:
        out.write("id,text\n")
        for block in range(40):
            out.write("".join(f"{block * 5000 + i},{'x' * 90}\n" for i in range(5000)))
    size = big.stat().st_size  # about 20 MB
    before = pa.total_allocated_bytes()
    records = inputs.iter_records(str(big))
    first = list(itertools.islice(records, 10))
    held = pa.total_allocated_bytes() - before
    assert [r["id"] for r in first] == list(range(10))
    assert held < size / 4, f"{held} bytes held for a {size}-byte file"
    records.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "body", "words"), [
    ("ragged.csv", b"a,b\n1,2\n1,2,3\n", "Expected 2 columns, got 3"),
    ("fake.parquet", b"a,b\n1,2\n", "not a valid parquet file"),
    ("empty.csv", b"", "Empty CSV file"),
    ("bad.ndjson", b'{"ok": 1}\n{"broken": \n', "line 2: not valid JSON"),
])
def test_unreadable_files_are_a_400_naming_the_file(tmp_path: Path, name: str, body: bytes,
                                                    words: str) -> None:
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(InvalidRequest) as caught:
        inputs.count_for_request(inputs.Source.of(str(path)), param="delimited_files")
    assert str(path) in caught.value.message and words in caught.value.message
    assert caught.value.param == "delimited_files.paths"
    # A worker reading it fails with the same words, never a bare pyarrow error.
    with pytest.raises(inputs.RecordError, match=words):
        list(inputs.iter_records(str(path)))


def test_a_missing_local_file_is_a_400_with_its_reason(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="FileNotFoundError") as caught:
        inputs.count_for_request(inputs.Source.of(str(tmp_path / "gone.csv")), param="d")
    assert str(tmp_path / "gone.csv") in caught.value.message


class Chatty(fsspec.AbstractFileSystem):  # type: ignore[misc]
    """A remote file system whose errors carry what its server answered."""

    protocol = "chatty"

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        raise RuntimeError("500 from 10.0.0.7: internal secret token=abc")

    def info(self, path: str, **kwargs: Any) -> Any:
        raise PermissionError("403 from 10.0.0.7: internal secret token=abc")

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        raise PermissionError("403 from 10.0.0.7: internal secret token=abc")


@pytest.fixture
def chatty() -> Iterator[None]:
    fsspec.register_implementation("chatty", Chatty, clobber=True)
    yield
    _registry.pop("chatty", None)


@pytest.mark.usefixtures("chatty")
def test_remote_failures_name_the_path_and_the_type_only() -> None:
    with pytest.raises(InvalidRequest) as listing:
        inputs.list_files(inputs.FileSelection(paths=("chatty://bucket/x",)), param="f")
    assert "chatty://bucket/x" in listing.value.message
    assert "Error" in listing.value.message and "secret" not in listing.value.message
    source = inputs.Source.of("chatty://bucket/x.csv")
    with pytest.raises(InvalidRequest) as counting:
        inputs.count_for_request(source, param="d")
    assert counting.value.message == "Cannot read 'chatty://bucket/x.csv': PermissionError"
    with pytest.raises(inputs.SourceUnavailable) as reading:  # an OSError: tried again
        list(inputs.iter_records(source))
    assert "secret" not in str(reading.value)


def _record(file_id: str, filename: str, **changes: Any) -> FileRecord:
    fields: dict[str, Any] = {"id": file_id, "project": "p", "filename": filename,
                              "purpose": "user_data", "bytes": 3, "created_at": 0,
                              "expires_at": None, "storage_key": f"files/{file_id}"}
    return FileRecord(**(fields | changes))


def test_uploaded_files_take_their_format_from_their_name(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-1").write_text("x,y\n1,2\n")
    store_url = str(tmp_path)
    source = inputs.uploaded(_record("file-1", "table.CSV"), "file-1",
                             lambda key: inputs.blob_url(store_url, key), param="d", now=1)
    assert source.format == ".csv" and source.shown == "file-1"
    assert source.url == str(tmp_path / "files" / "file-1")
    assert list(inputs.iter_records(source)) == [{"x": 1, "y": 2}]
    with pytest.raises(InvalidRequest, match=r"'file-2 \(notes.txt\)' is not a delimited"
                       ) as caught:
        inputs.check_delimited([source, inputs.uploaded(
            _record("file-2", "notes.txt"), "file-2", str, param="d", now=1)], param="d")
    assert caught.value.param == "d.file_ids"


def test_unknown_and_unusable_file_ids_get_one_answer() -> None:
    answers = set()
    for record in (None, _record("file-9", "a.csv", purpose="message_batch"),
                   _record("file-9", "a.csv", expires_at=10)):
        with pytest.raises(InvalidRequest) as caught:
            inputs.uploaded(record, "file-9", str, param="delimited_files", now=20)
        answers.add((caught.value.message, caught.value.param))
    assert answers == {("No uploaded file found with id 'file-9'.",
                        "delimited_files.file_ids")}


def test_file_ids_are_read_after_the_paths_in_the_order_given(tmp_path: Path) -> None:
    (tmp_path / "listed.csv").write_text("n\n1\n")
    (tmp_path / "blob-a").write_text('{"n": 2}\n')
    (tmp_path / "blob-b").write_text("n\n3\n")
    names = {"file-a": "a.jsonl", "file-b": "b.csv"}

    def resolve(file_id: str) -> inputs.Source:
        record = _record(file_id, names[file_id], storage_key=f"blob-{file_id[-1]}")
        return inputs.uploaded(record, file_id, lambda key: str(tmp_path / key),
                               param="delimited_files", now=0)

    job_input = JobInput(kind=InputKind.DELIMITED_FILES, batch_size=1,
                         paths=(str(tmp_path / "listed.csv"),), file_ids=("file-b", "file-a"))
    assert list(enqueue.iter_items(job_input, resolve)) == [{"n": 1}, {"n": 3}, {"n": 2}]
    lister = JobInput(kind=InputKind.FILE_PATH_LISTER, batch_size=1, file_ids=("file-a",))
    assert list(enqueue.iter_items(lister, resolve)) == [str(tmp_path / "blob-a")]
    with pytest.raises(enqueue.EnqueueError):
        list(enqueue.iter_items(lister))


def test_file_inputs_take_paths_or_file_ids_or_both() -> None:
    parsed = submission.parse({"delimited_files": {"file_ids": ["f-2", "f-1", "f-2"],
                                                   "batch_size": 1}})
    assert parsed.input.file_ids == ("f-2", "f-1") and parsed.input.paths == ()
    assert parsed.input.to_dict()["file_ids"] == ["f-2", "f-1"]
    both = submission.parse({"file_path_lister": {"paths": ["/x"], "file_ids": ["f-1"],
                                                  "batch_size": 1}})
    assert both.input.paths == ("/x",) and both.input.file_ids == ("f-1",)
    # A stored job of before file_ids reads back the same.
    assert "file_ids" not in submission.parse({"delimited_files": {
        "paths": ["/x"], "batch_size": 1}}).input.to_dict()
    for raw, param in (({"paths": [], "file_ids": []}, "delimited_files.paths"),
                       ({"file_ids": "f-1"}, "delimited_files.file_ids"),
                       ({"file_ids": [""]}, "delimited_files.file_ids")):
        with pytest.raises(InvalidRequest) as caught:
            submission.parse({"delimited_files": {**raw, "batch_size": 1}})
        assert caught.value.param == param

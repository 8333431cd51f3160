"""Job inputs on local files: globs, listing with includes and excludes, and streaming
NDJSON, CSV, TSV and Parquet records."""

from __future__ import annotations

import datetime
import decimal
import itertools
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchery.exceptions import InvalidRequest
from batchery.jobs import enqueue, inputs


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

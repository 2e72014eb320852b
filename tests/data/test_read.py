"""The streaming pool reader: incremental JSON array / JSONL parsing, path expansion, Ray reads."""

from __future__ import annotations

import gzip
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray.data.read import (
    READ_SCHEMA,
    SEQ_FILE_SHIFT,
    expand_paths,
    file_stem,
    id_prefixes,
    iter_records,
    read_pool,
)


class Trickle:
    """A binary file that returns at most ``n`` bytes per read (chunk boundaries everywhere)."""

    def __init__(self, data: bytes, n: int):
        self._f, self._n = io.BytesIO(data), n

    def read(self, _size: int = -1) -> bytes:
        return self._f.read(self._n)


def to_table(ds) -> pa.Table:
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def records(data: bytes, kind: str = "json", max_bytes: int = 10_000, chunk: int = 7):
    return list(iter_records(Trickle(data, chunk), kind, max_bytes))


def errors(items):
    return [e for _, e, _ in items]


GOOD = [{"i": i, "s": 'q"uote\\ [x] {y}, é' * (i % 3), "n": [i, {"k": None}]} for i in range(12)]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64, 1 << 20])
def test_array_any_chunking(chunk):
    text = json.dumps(GOOD, ensure_ascii=False, indent=2).encode()
    items = records(text, chunk=chunk)
    assert errors(items) == [None] * len(GOOD)
    assert [json.loads(t) for t, _, _ in items] == GOOD


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_jsonl_any_chunking_blank_lines_crlf_bom(chunk):
    lines = [json.dumps(r, ensure_ascii=False) for r in GOOD]
    data = ("\ufeff" + "\r\n\n  \n".join(lines) + "\n\n").encode()
    items = records(data, kind="jsonl", chunk=chunk)
    assert errors(items) == [None] * len(GOOD)
    assert [json.loads(t) for t, _, _ in items] == GOOD
    # .json files holding JSON lines are sniffed
    assert len(records(data, kind="json", chunk=chunk)) == len(GOOD)


def test_truncated_array_keeps_records_before_the_damage():
    text = json.dumps(GOOD).encode()
    cut = text[: text.index(b'{"i": 7')] + b'{"i": 7, "s": "unfini'
    items = records(cut, chunk=3)
    assert errors(items) == [None] * 7 + ["invalid_json"]
    assert "truncated" in items[-1][2]
    assert items[-1][0] == '{"i": 7, "s": "unfini'
    # cut between elements: no record lost, nothing to report
    assert errors(records(text[: text.index(b', {"i": 3')], chunk=4)) == [None] * 3


def test_damaged_element_resyncs_and_scalars_are_not_objects():
    data = b'[{"a": 1}, {"b": , 2}, {"c": "]}"}, 7, 1.5e3, "s", null, [1], {"d": 4} , {"e": tru}, {"f": 6}]'
    items = records(data, chunk=2)
    assert errors(items) == [
        None, "invalid_json", None, "not_an_object", "not_an_object", "not_an_object",
        "not_an_object", "not_an_object", None, "invalid_json", None,
    ]  # fmt: skip
    assert json.loads(items[2][0]) == {"c": "]}"}
    assert items[4][0] == "1.5e3"


def test_non_utf8_bytes_only_spoil_their_record():
    arr = b'[{"a": "ok"}, {"b": "bad \xff\xfe byte"}, {"c": "\xc3\xa9 fine"}]'
    items = records(arr, chunk=4)
    assert errors(items) == [None, "invalid_utf8", None]
    assert "\\xff\\xfe" in items[1][0]  # backslash-escaped raw text
    assert json.loads(items[2][0]) == {"c": "é fine"}
    lines = b'{"a": 1}\n{"b": "\xff"}\n{"c": 3}\n'
    assert errors(records(lines, kind="jsonl")) == [None, "invalid_utf8", None]


def test_records_too_large_are_skipped_with_a_prefix():
    big = "x" * 50_000
    arr = json.dumps([{"a": 1}, {"big": big}, {"c": 3}]).encode()
    items = records(arr, max_bytes=10_000, chunk=1000)
    assert errors(items) == [None, "record_too_large", None]
    assert items[1][0].startswith('{"big": "xxx') and len(items[1][0]) < 50_000
    lines = b'{"a": 1}\n' + json.dumps({"big": big}).encode() + b'\n{"c": 3}'
    items = records(lines, kind="jsonl", max_bytes=10_000, chunk=1000)
    assert errors(items) == [None, "record_too_large", None]
    # a huge unterminated element at the end: one row, never the whole tail in memory
    items = records(arr[: len(arr) // 2], max_bytes=10_000, chunk=1000)
    assert errors(items) == [None, "record_too_large"]
    assert "truncated" in items[1][2]


def test_jsonl_bad_lines_and_edge_files():
    data = b'{"a": 1}\n{"b": \n[1, 2]\n"str"\n{"c": 3}\n{"d": 4'
    assert errors(records(data, kind="jsonl")) == [
        None, "invalid_json", "not_an_object", "not_an_object", None, "invalid_json",
    ]  # fmt: skip
    assert records(b"", kind="jsonl") == []
    assert records(b"") == []
    assert records(b"  [ ]  ") == []
    deep = b"[" * 100_000 + b"]" * 100_000  # deep nesting: a reject, never a crash
    assert errors(records(b"[" + deep + b"]", max_bytes=10**6, chunk=1 << 16)) == ["invalid_json"]
    assert errors(records(deep, kind="jsonl", max_bytes=10**6)) == ["invalid_json"]
    # trailing garbage after the array is one reject; concatenated arrays are read on
    assert errors(records(b'[{"a": 1}] oops')) == [None, "invalid_json"]
    assert errors(records(b'[{"a": 1}]\n[{"b": 2}]')) == [None, None]


def test_expand_paths_dir_glob_list_sorted_unique(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["b.json", "a.jsonl", "sub/c.jsonl.gz", "sub/d.parquet", "notes.txt", "_tmp.json",
                 ".hidden/e.json"]:  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    want = [str(tmp_path / n) for n in ["a.jsonl", "b.json", "sub/c.jsonl.gz", "sub/d.parquet"]]
    assert expand_paths(str(tmp_path)) == want
    # a glob is taken as written (no name filter), sorted
    assert expand_paths(str(tmp_path / "[ab].json*")) == want[:2]
    assert expand_paths(str(tmp_path / "**" / "*.j*")) == [
        str(tmp_path / "_tmp.json"), *want[:3],
    ]  # fmt: skip
    # list order is kept, files repeat only once
    assert expand_paths([want[3], str(tmp_path)]) == [want[3], *want[:3]]
    with pytest.raises(FileNotFoundError):
        expand_paths(str(tmp_path / "missing.json"))


def test_file_stems_and_unique_id_prefixes():
    assert file_stem("/x/test.jsonl.gz") == "test"
    assert file_stem("/x/a.b.json") == "a.b"
    files = ["/d/mt_bench/question.jsonl", "/d/vicuna_bench/question.jsonl", "/d/alpaca.json",
             "/d/a/ref/gpt-4.jsonl", "/d/b/ref/gpt-4.jsonl"]  # fmt: skip
    assert id_prefixes(files) == {
        "/d/mt_bench/question.jsonl": "mt_bench/question",
        "/d/vicuna_bench/question.jsonl": "vicuna_bench/question",
        "/d/alpaca.json": "alpaca",
        "/d/a/ref/gpt-4.jsonl": "a/ref/gpt-4",
        "/d/b/ref/gpt-4.jsonl": "b/ref/gpt-4",
    }


def test_read_pool_all_file_kinds_with_ray(ray_local, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    (tmp_path / "1_array.json").write_text(json.dumps(rows))
    (tmp_path / "2_lines.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(tmp_path / "3_lines.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "4_table.parquet")
    (tmp_path / "5_bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip")
    ds = read_pool(str(tmp_path), block_rows=2)
    out = to_table(ds)
    assert out.schema == READ_SCHEMA
    out = out.sort_by("seq")
    files = expand_paths(str(tmp_path))
    assert [os.path.basename(f) for f in files][:4] == [
        "1_array.json", "2_lines.jsonl", "3_lines.jsonl.gz", "4_table.parquet",
    ]  # fmt: skip
    for rank in range(4):
        part = out.filter(pa.compute.equal(out["source"], files[rank])).to_pylist()
        assert [json.loads(r["record"]) for r in part] == rows
        assert [r["index"] for r in part] == list(range(5))
        assert [r["seq"] for r in part] == [(rank << SEQ_FILE_SHIFT) + i for i in range(5)]
        assert all(r["error"] is None for r in part)
    bad = out.filter(pa.compute.equal(out["source"], files[4])).to_pylist()
    assert [r["error"] for r in bad] == ["unreadable_file"]
    # the same pool read twice gives the same rows
    assert to_table(read_pool(str(tmp_path))).sort_by("seq").to_pylist() == out.to_pylist()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_fuzzed_damage_never_hangs_or_loses_earlier_records(kind):
    import random

    rng = random.Random(1234)
    elems = [json.dumps(r, ensure_ascii=False) for r in GOOD]
    if kind == "json":
        sep, head, tail = ", ", "[", "]"
    else:
        sep, head, tail = "\n", "", "\n"
    text = (head + sep.join(elems) + tail).encode()
    ends, pos = [], len(head.encode())
    for e in elems:
        pos += len(e.encode())
        ends.append(pos)
        pos += len(sep.encode())
    junk = [b"", b"}", b"]", b"{", b"[", b'"', b"\\", b",", b"\xff", b"\n", b"x", b":"]
    for _ in range(300):
        at = rng.randrange(len(text))
        mode = rng.randrange(3)
        if mode == 0:  # truncate
            data = text[:at]
        elif mode == 1:  # delete a span
            data = text[:at] + text[at + rng.randint(1, 20) :]
        else:  # insert junk
            data = text[:at] + rng.choice(junk) + rng.choice(junk) + text[at:]
        items = records(data, kind=kind, chunk=rng.choice([1, 3, 17, 4096]))
        intact = [e for e, end in zip(elems, ends, strict=True) if end < at]
        assert [t for t, _, _ in items[: len(intact)]] == intact
        assert all(err is None for _, err, _ in items[: len(intact)])
        assert all(isinstance(t, str) for t, _, _ in items)

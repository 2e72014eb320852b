"""The streaming pool reader: incremental JSON array / JSONL parsing, path expansion, Ray reads,
and the accounting of every byte (and Parquet row) of damaged files."""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray.data.read import (
    RAW_PIECE_BYTES,
    READ_SCHEMA,
    SEQ_FILE_SHIFT,
    FileReader,
    ReadLedger,
    Row,
    expand_paths,
    file_stem,
    id_prefixes,
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


def read_rows(
    data: bytes, kind: str = "json", max_bytes: int = 10_000, chunk: int = 7, gz: bool = False
) -> tuple[list[Row], dict]:
    """The reader's rows of ``data`` and its counts."""
    reader = FileReader(Trickle(data, chunk), kind, max_bytes, gzip=gz)
    return list(reader), reader.counts


def records(data: bytes, kind: str = "json", max_bytes: int = 10_000, chunk: int = 7):
    """(record, error, detail) of every row; the rows' ranges are checked on the way."""
    rows, counts = read_rows(data, kind, max_bytes, chunk)
    assert_accounted(data, rows, counts)
    return [(r.record, r.error, r.detail) for r in rows]


def errors(items):
    return [e for _, e, _ in items]


BOM = b"\xef\xbb\xbf"
SYNTAX = frozenset(b" \t\r\n\x0b\x0c,[]")


def only_syntax(data: bytes) -> bool:
    return set(data.replace(BOM, b"")) <= SYNTAX


def assert_accounted(stream: bytes, rows: list[Row], counts: dict, unit: str = "bytes") -> None:
    """Check the rows of ``stream`` apart from the reader's own bookkeeping: their ranges (in
    ``unit``) are disjoint and in order, each holds exactly its record (or, for a reject, its
    raw text, at most RAW_PIECE_BYTES bytes), and every byte between them is JSON syntax; so
    bytes in ranges + syntax bytes == the stream's size. The reader's counts must agree."""
    at = covered = syntax = 0
    for r in (r for r in rows if r.unit == unit):
        assert at <= r.start <= r.end <= len(stream), (at, r)
        gap = stream[at : r.start]
        assert only_syntax(gap), (at, r.start, gap[:80])
        syntax += len(gap)
        piece = stream[r.start : r.end]
        if r.error is None:
            assert piece.decode("utf-8") == r.record
        elif r.error == "unreadable_file" and r.record == "":
            pass  # bytes that could not be read at all
        else:
            assert piece.decode("utf-8", "backslashreplace") == r.record, r
            assert r.end - r.start <= RAW_PIECE_BYTES
        covered += r.end - r.start
        at = r.end
    assert only_syntax(stream[at:]), stream[at : at + 80]
    syntax += len(stream) - at
    assert covered + syntax == len(stream)
    assert (counts["unit"], counts["stream"]) == (unit, len(stream))
    assert (counts["covered"], counts["syntax"], counts["rows"]) == (covered, syntax, len(rows))


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


@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_records_too_large_go_out_whole_in_pieces(chunk):
    big = "é" * 100_000  # 200 KB: four pieces of at most 64 KiB, cut between characters
    arr = json.dumps([{"a": 1}, {"big": big}, {"c": 3}], ensure_ascii=False).encode()
    items = records(arr, max_bytes=10_000, chunk=chunk)
    assert errors(items) == [None, *["record_too_large"] * 4, None]
    assert "".join(t for t, _, _ in items[1:5]) == json.dumps({"big": big}, ensure_ascii=False)
    assert "[piece 4 of the reject from byte" in items[4][2]
    lines = b'{"a": 1}\n' + json.dumps({"big": big}, ensure_ascii=False).encode() + b'\n{"c": 3}'
    items = records(lines, kind="jsonl", max_bytes=10_000, chunk=chunk)
    assert errors(items) == [None, *["record_too_large"] * 4, None]
    # pieces never depend on how the stream was chunked
    assert read_rows(lines, "jsonl", 10_000, 1)[0] == read_rows(lines, "jsonl", 10_000, 1 << 20)[0]
    # a huge unterminated element at the end: all of it, streamed out in pieces
    items = records(arr[: len(arr) // 2], max_bytes=10_000, chunk=chunk)
    assert errors(items) == [None, "record_too_large", "record_too_large"]
    assert "ends inside" in items[2][2] and "ends inside" not in items[1][2]


def test_jsonl_bad_lines_and_edge_files():
    data = b'{"a": 1}\n{"b": \n[1, 2]\n"str"\n{"c": 3}\n{"d": 4'
    assert errors(records(data, kind="jsonl")) == [
        None, "invalid_json", "not_an_object", "not_an_object", None, "invalid_json",
    ]  # fmt: skip
    assert records(b"", kind="jsonl") == []
    assert records(b"") == []
    assert records(b"  [ ]  ") == []
    deep = b"[" * 100_000 + b"]" * 100_000  # deep nesting: a reject (200 KB: 4 pieces)
    assert (
        errors(records(b"[" + deep + b"]", max_bytes=10**6, chunk=1 << 16)) == ["invalid_json"] * 4
    )
    assert errors(records(deep, kind="jsonl", max_bytes=10**6)) == ["invalid_json"] * 4
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


# ---------------------------------------------------------------------------------------------
# Damaged files in every encoding: every record and every byte is accounted for

POOL = [
    {"instruction": f"question {i} " + "é" * (i % 4), "output": "answer " * (i % 7), "n": i}
    for i in range(40)
]


def pool_text(kind: str) -> tuple[bytes, list[tuple[int, int]]]:
    """A JSON array or JSON lines encoding of POOL and the byte range of every record."""
    texts = [json.dumps(r, ensure_ascii=False).encode() for r in POOL]
    head, sep, tail = (b"[\n ", b",\n ", b"\n]\n") if kind == "json" else (b"", b"\n", b"\n")
    spans, pos = [], len(head)
    for t in texts:
        spans.append((pos, pos + len(t)))
        pos += len(t) + len(sep)
    return head + sep.join(texts) + tail, spans


def gunzip_prefix(data: bytes) -> tuple[bytes, int]:
    """What zlib can decompress from ``data`` before any damage, fed one byte at a time (a
    single gzip member), and how many compressed bytes that took."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = []
    for k in range(len(data)):
        try:
            out.append(d.decompress(data[k : k + 1]))
        except zlib.error:
            return b"".join(out), k
        if d.eof:
            return b"".join(out), k + 1
    return b"".join(out), len(data)


def kept_before_damage(rows: list[Row], stream: bytes, original: bytes, spans) -> None:
    """Every record of ``original`` that ends before the first byte where ``stream`` differs
    from it is a good row with its own range."""
    common = zip(stream, original, strict=False)
    damage = next((i for i, (a, b) in enumerate(common) if a != b), len(stream))
    good = {(r.start, r.end): r.record for r in rows if r.error is None}
    for (a, b), rec in zip(spans, POOL, strict=True):
        if b <= damage:
            assert json.loads(good[(a, b)]) == rec, (a, b, damage)


def damaged_texts(original: bytes) -> dict[str, bytes]:
    n = len(original)
    out = {f"cut_{f}": original[: int(n * f)] for f in (0.0, 0.13, 0.5, 0.77, 0.999)}
    out["cut_after_a_record"] = original[: original.index(b"question 9") - 20]
    for f in (0.1, 0.6):
        at = int(n * f)
        out[f"garbage_{f}"] = original[:at] + b'}\x00\xff{"x": [\x01 ]]' + original[at:]
        out[f"stray_quote_{f}"] = original[:at] + b'"' + original[at:]
        out[f"bad_utf8_{f}"] = original[:at] + b"\xc3\x28\xa0\xa1" + original[at:]
    out["deleted_span"] = original[: n // 3] + original[n // 3 + 57 :]
    out["trailing_junk"] = original + b"\x00\x01 not json \xff" * 5000  # 100 KB: 2 pieces
    return out


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_damaged_text_files_account_for_every_byte(kind):
    original, spans = pool_text(kind)
    for name, data in damaged_texts(original).items():
        rows, counts = read_rows(data, kind, chunk=97)
        assert_accounted(data, rows, counts)  # ranges + syntax == file size
        assert counts["file_bytes"] == len(data), name
        kept_before_damage(rows, data, original, spans)
        # the same rows whatever the chunking
        assert rows == read_rows(data, kind, chunk=1 << 20)[0], name
    # an intact file: one good row per record, exactly its text
    rows, counts = read_rows(original, kind)
    assert [json.loads(r.record) for r in rows] == POOL
    assert [(r.start, r.end) for r in rows] == spans


def test_truncated_gzip_keeps_every_complete_line_and_rejects_the_tail():
    import random

    rng = random.Random(7)
    lines = [
        {"instruction": f"q{i} " + "".join(rng.choices("abcdefé xyz", k=60)), "output": str(i)}
        for i in range(320)
    ]
    text = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in lines)
    gz = gzip.compress(text, mtime=0)
    for f in (0.05, 0.3, 0.5, 0.8, 0.97):
        cut = gz[: int(len(gz) * f)]
        stream, _ = gunzip_prefix(cut)
        complete = stream.count(b"\n")
        rows, counts = read_rows(cut, "jsonl", chunk=4096, gz=True)
        good = [r for r in rows if r.error is None]
        assert len(good) == complete > 0, f  # main kept none of them
        assert [json.loads(r.record) for r in good] == lines[:complete]
        tail = [r for r in rows if r.error is not None]
        assert [r.error for r in tail] == ["truncated_file"]
        assert "partial download" in tail[0].detail
        assert (tail[0].start, tail[0].end) == (stream.rindex(b"\n") + 1, len(stream.rstrip()))
        assert tail[0].record == stream[tail[0].start : tail[0].end].decode(
            "utf-8", "backslashreplace"
        )
        assert_accounted(stream, rows, counts, "decompressed_bytes")
        assert counts["file_bytes"] == len(cut) and counts["decompressed"] == len(stream)
    # cut exactly after a newline: every line kept, one empty reject names the cut
    for end in range(len(gz) - 8, 0, -1):
        stream, _ = gunzip_prefix(gz[:end])
        if stream.endswith(b"\n"):
            break
    rows, counts = read_rows(gz[:end], "jsonl", gz=True)
    assert [r.error for r in rows].count(None) == stream.count(b"\n")
    assert [(r.error, r.start, r.end, r.record) for r in rows if r.error] == [
        ("truncated_file", len(stream), len(stream), "")
    ]
    assert_accounted(stream, rows, counts, "decompressed_bytes")


def gzip_damages() -> dict[str, bytes]:
    text, _ = pool_text("jsonl")
    gz = gzip.compress(text, mtime=0)
    n = len(gz)
    bad_text = text.replace(b"question 7", b"question \xff\xfe")
    mid = bytearray(gz)
    mid[n // 2 : n // 2 + 6] = b"\xff\x00\xff\x00\xff\x00"
    crc = bytearray(gz)
    crc[-6] ^= 0xFF  # the CRC32 in the trailer
    return {
        "cut_in_header": gz[:5],
        "cut_in_data": gz[: n // 3],
        "cut_in_trailer": gz[: n - 3],
        "garbage_in_data": bytes(mid),
        "bad_crc": bytes(crc),
        "junk_after_member": gz + b"this is not gzip" * 5000,
        "not_gzip_at_all": b"\x1f\x8b\x08\x00garbage-not-gzip",
        "invalid_utf8_inside": gzip.compress(bad_text, mtime=0),
        "two_members": gz + gzip.compress(text, mtime=0),
    }


@pytest.mark.parametrize("name", list(gzip_damages()))
def test_damaged_gzip_accounts_for_decompressed_and_compressed_bytes(name):
    data = gzip_damages()[name]
    rows, counts = read_rows(data, "jsonl", chunk=1000, gz=True)
    if name == "two_members":
        stream, used = gzip.decompress(data), len(data)
    else:
        stream, used = gunzip_prefix(data)
    # every decompressed byte: in a row's range or syntax between rows
    assert_accounted(stream, rows, counts, "decompressed_bytes")
    # every compressed byte: decoded, or in a reject that holds it, up to the end of the file
    raw = [r for r in rows if r.unit == "bytes"]
    at = min([r.start for r in raw], default=len(data))
    for r in raw:
        assert r.start == at and r.error == "unreadable_file"
        assert r.record == data[r.start : r.end].decode("utf-8", "backslashreplace")
        at = r.end
    assert at == len(data) and counts["file_bytes"] == len(data)
    errors_ = [r.error for r in rows if r.error]
    original, spans = pool_text("jsonl")
    if name in ("cut_in_data", "cut_in_trailer"):
        assert errors_ and set(errors_) == {"truncated_file"}
    if name in ("garbage_in_data", "bad_crc", "junk_after_member", "not_gzip_at_all"):
        assert "unreadable_file" in errors_
    if name == "invalid_utf8_inside":
        assert errors_ == ["invalid_utf8"]
    if name == "two_members":
        assert errors_ == [] and len(rows) == 2 * len(POOL)
    if name != "two_members":
        kept_before_damage(rows, stream, original, spans)


def parquet_file(tmp_path, groups: int = 3, per_group: int = 10) -> tuple[str, pa.Table]:
    table = pa.Table.from_pylist(POOL[: groups * per_group])
    path = str(tmp_path / "pool.parquet")
    pq.write_table(
        table, path, row_group_size=per_group, compression="none", write_page_checksum=True
    )
    return path, table


def read_parquet_rows(path: str) -> tuple[list[Row], dict]:
    with open(path, "rb") as f:
        reader = FileReader(pa.PythonFile(f, mode="r"), "parquet")
        return list(reader), reader.counts


def test_parquet_corrupt_page_rejects_its_row_group_rows_with_what_still_reads(tmp_path):
    path, table = parquet_file(tmp_path)
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(0)  # the "instruction" column of the second row group
    data = bytearray(Path(path).read_bytes())
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    at = start + col.total_compressed_size - 20  # inside the column chunk's last page
    data[at : at + 8] = b"\xde\xad\xbe\xef" * 2
    Path(path).write_bytes(bytes(data))
    rows, counts = read_parquet_rows(path)
    assert [r.unit for r in rows] == ["rows"] * 30
    assert [(r.start, r.end) for r in rows] == [(i, i + 1) for i in range(30)]  # rows tile
    assert counts == {"rows": 30, "unit": "rows", "stream": 30, "covered": 30, "syntax": 0,
                      "file_bytes": len(data), "decompressed": None}  # fmt: skip
    assert [r.error for r in rows] == [None] * 10 + ["unreadable_row_group"] * 10 + [None] * 10
    assert [json.loads(r.record) for r in rows[:10] + rows[20:]] == POOL[:10] + POOL[20:30]
    lost = [json.loads(r.record) for r in rows[10:20]]  # the columns that still decode
    assert lost == [{k: v for k, v in rec.items() if k != "instruction"} for rec in POOL[10:20]]
    assert "instruction" in rows[10].detail


@pytest.mark.parametrize("damage", ["footer", "truncated", "magic"])
def test_parquet_without_a_footer_is_rejected_whole_in_byte_pieces(tmp_path, damage):
    path = tmp_path / "big.parquet"
    rows = [{**r, "k": i} for i, r in enumerate(POOL * 100)]
    pq.write_table(pa.Table.from_pylist(rows), path, compression="none", use_dictionary=False)
    data = path.read_bytes()
    assert len(data) > 2 * RAW_PIECE_BYTES
    if damage == "footer":
        footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
        data = data[:footer] + b"\xff" * 32 + data[footer + 32 :]  # the Thrift metadata
    elif damage == "truncated":
        data = data[: len(data) * 3 // 5]
    else:
        data = data[:-4] + b"PAR0"
    path.write_bytes(data)
    rows, counts = read_parquet_rows(str(path))
    assert {r.error for r in rows} == {"unreadable_file"} and len(rows) > 1
    assert_accounted(data, rows, counts)
    assert "not a readable Parquet file" in rows[0].detail


def test_read_pool_ledger_counts_every_file_and_the_check_can_fail(ray_local, tmp_path):
    text, _ = pool_text("json")
    files = {
        "a_cut.json": text[: len(text) // 2],
        "b_garbage.jsonl": pool_text("jsonl")[0].replace(b'"n": 5}', b'"n": 5\xff'),
        "c_cut.jsonl.gz": gzip.compress(pool_text("jsonl")[0] * 4, mtime=0)[:900],
        "e_empty.jsonl": b"",
        "f_blank.json": b"  \n [ ] \n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    parquet_file(tmp_path)  # pool.parquet, intact
    ledger = ReadLedger()
    try:
        out = to_table(read_pool(str(tmp_path), ledger=ledger, block_rows=7)).sort_by("seq")
        counts = ledger.counts()
        assert ledger.check() == out.num_rows
    finally:
        ledger.close()
    assert sorted(counts) == sorted(str(tmp_path / n) for n in [*files, "pool.parquet"])
    for path, c in counts.items():
        rows = [
            Row(r["record"], r["error"], r["detail"], r["range_start"], r["range_end"],
                r["range_unit"])
            for r in out.filter(pa.compute.equal(out["source"], path)).to_pylist()
        ]  # fmt: skip
        data = Path(path).read_bytes()
        assert c["rows"] == len(rows) and c["file_bytes"] == len(data), path
        if path.endswith(".gz"):
            assert_accounted(gunzip_prefix(data)[0], rows, c, "decompressed_bytes")
        elif not path.endswith(".parquet"):
            assert_accounted(data, rows, c)
    # a stage that loses a row (here: a filter) no longer balances against the ledger
    from ray.data.expressions import col

    from deita_ray.data.sink import write_with_rejects

    ledger = ReadLedger()
    try:
        ds = read_pool(str(tmp_path), ledger=ledger).filter(expr=col("index") != 3)
        c = write_with_rejects(ds, "lossy", str(tmp_path / "out"), rows_in=ledger.check)
    finally:
        ledger.close()
    assert c.rows_in == out.num_rows and not c.balanced
    with pytest.raises(RuntimeError, match="accounting broken"):
        c.check("lossy")
    with pytest.raises(TypeError):
        write_with_rejects(ds, "lossy", str(tmp_path / "out"))  # rows_in is required


class FailingRead(Trickle):
    """A file whose reads fail with an I/O error after ``fail_at`` bytes (a dying disk)."""

    def __init__(self, data: bytes, n: int, fail_at: int):
        super().__init__(data, n)
        self._fail_at = fail_at

    def read(self, _size: int = -1) -> bytes:
        if self._f.tell() >= self._fail_at:
            raise OSError(5, "Input/output error")
        return super().read(_size)


@pytest.mark.parametrize("gz", [False, True])
def test_read_error_keeps_what_was_read_and_rejects_the_unread_bytes(gz):
    text, spans = pool_text("jsonl")
    data = gzip.compress(text, mtime=0) if gz else text
    fail_at = len(data) // 200 * 100  # reads of 100 bytes: the failing one starts here
    reader = FileReader(FailingRead(data, 100, fail_at), "jsonl", gzip=gz, size=lambda: len(data))
    rows = list(reader)
    last = rows[-1]
    assert (last.error, last.start, last.end, last.unit, last.record) == (
        "unreadable_file", fail_at, len(data), "bytes", "",
    )  # fmt: skip
    assert "Input/output error" in last.detail
    assert reader.counts["file_bytes"] == len(data)
    if gz:  # decompressed what was read; the unread compressed bytes are one reject
        assert_accounted(
            gunzip_prefix(data[:fail_at])[0], rows, reader.counts, "decompressed_bytes"
        )
        stream = gunzip_prefix(data[:fail_at])[0]
    else:  # the unread bytes are one reject without raw text
        assert_accounted(data, rows, reader.counts)
        stream = data[:fail_at]
    kept_before_damage(rows, stream, text, spans)


@pytest.mark.timeout(120)
def test_fuzzed_gzip_damage_accounts_for_every_byte():
    import random

    rng = random.Random(99)
    text, spans = pool_text("jsonl")
    gz = gzip.compress(text, mtime=0)
    for _ in range(60):
        at = rng.randrange(len(gz))
        mode = rng.randrange(3)
        if mode == 0:
            data = gz[:at]
        elif mode == 1:
            data = gz[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 9))) + gz[at:]
        else:
            data = gz[:at] + gz[at + rng.randint(1, 30) :]
        rows, counts = read_rows(data, "jsonl", chunk=rng.choice([1, 50, 4096]), gz=True)
        stream, _ = gunzip_prefix(data)
        assert_accounted(stream, rows, counts, "decompressed_bytes")
        raw = [r for r in rows if r.unit == "bytes"]
        assert sum(r.end - r.start for r in raw) + (raw[0].start if raw else len(data)) == len(data)
        assert counts["file_bytes"] == len(data)
        kept_before_damage(rows, stream, text, spans)
        if data != gz:  # damage never passes unreported
            assert any(r.error for r in rows), (mode, at)

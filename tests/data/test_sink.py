"""The splitting sink: one pass, accepted rows and rejects apart, counts from disk, resumable."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from deita_ray.data.rejects import (
    DETAIL,
    RANGE_END,
    RANGE_START,
    RANGE_UNIT,
    RAW,
    REASON,
    REJECTS_SCHEMA,
)
from deita_ray.data.sink import (
    TMP_PREFIX,
    count_written,
    finished_seqs,
    parquet_files,
    rejects_dir,
    skip_finished,
    split_block,
    stage_dir,
    write_with_rejects,
)


def _marked(n: int, bad_every: int = 3) -> pa.Table:
    bad = [i % bad_every == 0 for i in range(n)]
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "seq": pa.array(range(n), pa.int64()),
            "value": [float(i) for i in range(n)],
            REASON: [
                ("too_odd" if i % 2 else "too_even") if b else None for i, b in enumerate(bad)
            ],
            DETAIL: ["detail" if b else None for b in bad],
            RAW: [f'{{"v": {i}}}' if b else None for i, b in enumerate(bad)],
        }
    )


def test_split_block_separates_rows_and_keeps_raw():
    good, bad = split_block(_marked(9), "score")
    assert good.column_names == ["id", "seq", "value"]
    assert good["id"].to_pylist() == ["r1", "r2", "r4", "r5", "r7", "r8"]
    assert bad.schema == REJECTS_SCHEMA
    assert bad["id"].to_pylist() == ["r0", "r3", "r6"]
    assert bad["reason"].to_pylist() == ["too_even", "too_odd", "too_even"]
    assert bad["raw"].to_pylist() == ['{"v": 0}', '{"v": 3}', '{"v": 6}']
    assert set(bad["stage"].to_pylist()) == {"score"}


def test_split_block_carries_input_ranges_to_rejects():
    t = _marked(6).append_column(RANGE_START, pa.array(range(0, 60, 10), pa.int64()))
    t = t.append_column(RANGE_END, pa.array(range(5, 65, 10), pa.int64()))
    t = t.append_column(RANGE_UNIT, pa.array(["bytes"] * 6))
    good, bad = split_block(t, "ingest")
    assert good.column_names == ["id", "seq", "value"]  # ranges are marks: not kept
    assert bad.schema == REJECTS_SCHEMA
    assert bad.select(["range_start", "range_end", "range_unit"]).to_pylist() == [
        {"range_start": 0, "range_end": 5, "range_unit": "bytes"},
        {"range_start": 30, "range_end": 35, "range_unit": "bytes"},
    ]
    # a stage without ranges: its rejects have null ones
    assert split_block(_marked(3), "x")[1]["range_start"].to_pylist() == [None]


def test_unmarked_table_passes_through():
    t = pa.table({"id": ["a"], "seq": [1]})
    good, bad = split_block(t, "x")
    assert good.equals(t) and bad.num_rows == 0


def test_write_with_rejects_counts_balance_and_match_disk(ray_local, tmp_path):
    ds = ray_local.data.from_arrow(_marked(300)).repartition(4)
    counts = write_with_rejects(ds, "score", str(tmp_path), rows_in=ds.count)
    assert counts.rows_out == 200 and counts.rows_rejected == 100 and counts.balanced
    assert counts.rejected_by_reason == {"too_even": 50, "too_odd": 50}
    out = pads.dataset(stage_dir(str(tmp_path), "score")).to_table()
    assert sorted(out["seq"].to_pylist()) == [i for i in range(300) if i % 3]
    assert REASON not in out.column_names
    rej = pads.dataset(rejects_dir(str(tmp_path), "score")).to_table()
    assert sorted(rej["seq"].to_pylist()) == list(range(0, 300, 3))


def test_interrupted_stage_resumes_without_redoing_or_losing_rows(ray_local, tmp_path):
    out = str(tmp_path)
    table = _marked(200)
    # An "interrupted" run wrote the first 120 rows, and a task died mid-write.
    write_with_rejects(ray_local.data.from_arrow(table.slice(0, 120)), "embed", out, rows_in=120)
    open(os.path.join(stage_dir(out, "embed"), TMP_PREFIX + "part-x.parquet"), "wb").close()
    assert finished_seqs(out, "embed").tolist() == list(range(120))

    rest = skip_finished(ray_local.data.from_arrow(table), out, "embed")
    assert rest.count() == 80  # only the unfinished rows are worked on again
    counts = write_with_rejects(rest, "embed", out, rows_in=200)
    assert counts.balanced and counts.rows_out + counts.rows_rejected == 200
    assert not any(n.startswith(TMP_PREFIX) for n in os.listdir(stage_dir(out, "embed")))
    done = pads.dataset(stage_dir(out, "embed")).to_table()["seq"].to_pylist()
    rej = pads.dataset(rejects_dir(out, "embed")).to_table()["seq"].to_pylist()
    assert sorted(done + rej) == list(range(200))  # nothing twice, nothing lost


def test_count_written_of_a_missing_stage_is_zero(tmp_path):
    c = count_written(str(tmp_path), "nothing")
    assert (c.rows_out, c.rows_rejected) == (0, 0)


def test_parquet_files_skips_temp_files_and_recurses_on_request(tmp_path):
    for name in ("b.parquet", "a.parquet", TMP_PREFIX + "c.parquet", "d.json", "sub/e.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    assert parquet_files(str(tmp_path)) == [str(tmp_path / n) for n in ("a.parquet", "b.parquet")]
    assert parquet_files(str(tmp_path), recursive=True) == [
        str(tmp_path / n) for n in ("a.parquet", "b.parquet", "sub/e.parquet")
    ]
    assert parquet_files(str(tmp_path / "missing")) == []


@pytest.mark.parametrize("n", [0, 1])
def test_skip_finished_on_fresh_stage_is_identity(ray_local, tmp_path, n):
    ds = ray_local.data.from_arrow(_marked(max(n, 1)))
    assert skip_finished(ds, str(tmp_path), "score") is ds

"""Exports of the selection: ShareGPT, OpenAI messages and Alpaca records, LLaMA-Factory's
dataset_info.json, loading with the `datasets` package, and the round trip: exporting then
ingesting (the real ingest stage) gives the same canonical rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray.config import ConfigError, PipelineConfig, load_config
from deita_ray.data.exports import EXPORT_FORMATS, dataset_info, export_record, unify_types
from deita_ray.data.formats import CANONICAL_SCHEMA, Reject, canonicalize

REPO = Path(__file__).resolve().parents[1]

REAL = [  # (file under ../shared/data, records used, role_map)
    ("alpaca/alpaca_5000.json", 150, None),
    ("llama_factory/lima.json", 150, None),  # Alpaca with history
    ("fastchat/dummy_conversation.json", 150, None),  # ShareGPT with ids
    ("llama_factory/kto_en_demo.json", 60, None),  # OpenAI messages + a label field
    (
        "llama_factory/glaive_toolcall_en_demo.json",
        40,
        {"function_call": "assistant", "observation": "user"},
    ),
]


def _row(record: dict, fallback_id: str, role_map=None) -> dict:
    """A canonical row as ingest makes it (its own id, else the fallback)."""
    c = canonicalize(record, role_map=role_map)
    assert not isinstance(c, Reject), c
    return {
        "id": c["id"] or fallback_id,
        "messages": c["messages"],
        "extra": json.dumps(c["extra"]),
    }


def _same(a: dict, b: dict) -> bool:
    return (
        a["id"] == b["id"]
        and a["messages"] == b["messages"]
        and json.loads(a["extra"]) == json.loads(b["extra"])
    )


QA = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]

EDGE_ROWS = [
    # System prompt, two turns.
    {
        "id": "sys-2turns",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi <b>there</b>"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And 2+2?"},
            {"role": "assistant", "content": ""},
        ],
        "extra": json.dumps({"category": "chat", "score": 3}),
    },
    # A reply before the first question, and a question left unanswered: not Alpaca.
    {
        "id": "odd-shape",
        "messages": [
            {"role": "assistant", "content": "Welcome!"},
            {"role": "user", "content": "thanks"},
        ],
        "extra": "{}",
    },
    {
        "id": "no-reply",
        "messages": [{"role": "user", "content": "anyone?"}],
        "extra": "{}",
    },
    # Extra fields no one column type holds: a list of strings and numbers, and a nested
    # number in one row that is text in another. Readers load a file as one table.
    {
        "id": "tags-mixed",
        "messages": QA,
        "extra": json.dumps({"tags": ["seed", 0], "meta": {"n": 1}}),
    },
    {"id": "tags-text", "messages": QA, "extra": json.dumps({"tags": ["a"], "meta": {"n": "one"}})},
]
RETYPED = {"tags": 2, "meta": 2}
"""Fields of EDGE_ROWS written as JSON text, and in how many rows."""


def test_records_of_each_format():
    row = EDGE_ROWS[0]
    got = {f: export_record(row["id"], row["messages"], row["extra"], f) for f in EXPORT_FORMATS}
    assert got["sharegpt"] == (
        {
            "id": "sys-2turns",
            "category": "chat",
            "score": 3,
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi <b>there</b>"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "And 2+2?"},
                {"from": "gpt", "value": ""},
            ],
        },
        [],
    )
    assert got["messages"][0]["messages"] == row["messages"]
    assert got["alpaca"][0] == {
        "id": "sys-2turns",
        "category": "chat",
        "score": 3,
        "instruction": "And 2+2?",
        "input": "",
        "output": "",
        "system": "Be brief.",
        "history": [["Hi <b>there</b>", "Hello."]],
    }


@pytest.mark.parametrize(
    "roles",
    [
        ["assistant", "user"],
        ["user"],
        ["user", "assistant", "assistant"],
        ["user", "assistant", "system", "user", "assistant"],
        ["system"],
    ],
)
def test_alpaca_refuses_what_it_cannot_hold(roles):
    msgs = [{"role": r, "content": f"m{i}"} for i, r in enumerate(roles)]
    out = export_record("x", msgs, "{}", "alpaca")
    assert isinstance(out, Reject) and out.reason == "not_alpaca_shape"
    assert ",".join(roles) in out.detail
    empty_system = [{"role": "system", "content": ""}, *QA]
    assert export_record("x", empty_system, "{}", "alpaca").reason == "not_alpaca_shape"
    for fmt in ("sharegpt", "messages"):
        assert not isinstance(export_record("x", msgs, "{}", fmt), Reject)


def test_extra_fields_that_would_change_the_shape_are_left_out():
    extra = json.dumps({"conversations": [{"from": "human", "value": "q", "weight": 0}], "w": 1})
    msgs = QA
    record, dropped = export_record("r", msgs, extra, "sharegpt")
    assert dropped == ["conversations"] and record["w"] == 1
    assert record["conversations"][0] == {"from": "human", "value": "q"}
    _, dropped = export_record("r", msgs, json.dumps({"input": "x", "output": "y"}), "alpaca")
    assert dropped == ["input", "output"]


def test_integer_ids_round_trip_and_mixed_types_become_one():
    row = _row({"id": 7, "instruction": "q", "output": "a"}, "unused")
    assert row["id"] == "7" and json.loads(row["extra"]) == {"id": 7}
    for fmt in EXPORT_FORMATS:
        record, _ = export_record(row["id"], row["messages"], row["extra"], fmt)
        assert record["id"] == 7 and _same(_row(record, "lost"), row)
    # Integer ids in one input, text ids in another: one column needs one type.
    records = [{"id": 7, "tag": "a"}, {"id": "x:1", "tag": ["b"]}, {"id": 8, "tag": None}]
    assert unify_types(records, ["7", "x:1", "8"]) == {"id": 2, "tag": 2}
    assert records == [
        {"id": "7", "tag": '"a"'},
        {"id": "x:1", "tag": '["b"]'},
        {"id": "8", "tag": None},
    ]


@pytest.mark.parametrize(
    "values,mixed",
    [
        ([["seed", 0]], True),  # mixed inside one value
        ([1, 2.5, None], False),  # integers and floats share a number column
        ([True, 1], True),
        ([{"a": 1}, {"b": "x"}, {}], False),  # keys may differ
        ([{"a": 1}, {"a": "x"}], True),
        ([[], [1], [[2]]], True),  # numbers and lists in one list column
        ([[], [{"a": [1]}], [{"a": None, "b": "s"}]], False),
        (["x", ["x"]], True),
    ],
)
def test_a_field_is_retyped_exactly_when_no_column_type_holds_it(values, mixed):
    records = [{"id": f"r{i}", "f": v} for i, v in enumerate(values)]
    changed = unify_types(records, [r["id"] for r in records])
    if not mixed:
        assert changed == {} and [r["f"] for r in records] == values
        return
    assert changed == {"f": sum(v is not None for v in values)}
    assert [r["f"] if r["f"] is None else json.loads(r["f"]) for r in records] == values


def test_round_trip_of_real_rows(shared_data):
    """Every real row, exported and read back by ingest's own record reader, is the same row."""
    held = {f: 0 for f in EXPORT_FORMATS}
    refused = 0
    for name, n, role_map in REAL:
        records = json.loads((shared_data / name).read_text())[:n]
        for k, record in enumerate(records):
            row = _row(record, f"{Path(name).stem}:{k}", role_map)
            for fmt in EXPORT_FORMATS:
                out = export_record(row["id"], row["messages"], row["extra"], fmt)
                if isinstance(out, Reject):
                    assert fmt == "alpaca", (name, k, out)
                    refused += 1
                    continue
                record_out, dropped = out
                assert dropped == []
                back = _row(json.loads(json.dumps(record_out)), "lost-id")
                assert _same(back, row), (name, k, fmt)
                held[fmt] += 1
    total = sum(n for _, n, _ in REAL)
    assert held["sharegpt"] == held["messages"] == total
    assert held["alpaca"] + refused == total and held["alpaca"] > total // 2


def test_dataset_info_entries():
    info = dataset_info("sel", ["messages", "sharegpt", "alpaca"])
    assert sorted(info) == ["sel_alpaca", "sel_messages", "sel_sharegpt"]
    assert info["sel_sharegpt"]["formatting"] == "sharegpt"
    assert info["sel_sharegpt"]["columns"] == {"messages": "conversations"}
    assert info["sel_alpaca"]["columns"]["history"] == "history"
    # OpenAI messages: LLaMA-Factory's sharegpt formatting with the OpenAI tags
    assert info["sel_messages"] == {
        "file_name": "messages.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }
    assert list(dataset_info("sel", ["messages"])) == ["sel_messages"]


def test_export_config_is_checked():
    from deita_ray.job import load_job

    cfg = load_job(data={"demo_pool": True, "export": {"formats": ["alpaca"]}})
    assert cfg.export.formats == ["alpaca"]
    with pytest.raises(ConfigError, match="export.formats"):
        load_job(data={"demo_pool": True, "export": {"formats": ["parquet"]}})


# ---------------------------------------------------------------------------------------------
# Files: the CLI, the pipeline stage, datasets, and the real ingest stage reading them back


def _selection(out: Path, shared_data: Path) -> list[dict]:
    """A select folder (canonical columns + rank, in rank order) of real and edge rows."""
    rows = list(EDGE_ROWS)
    for name, _n, role_map in REAL[1:4]:
        records = json.loads((shared_data / name).read_text())[:12]
        rows += [_row(r, f"{Path(name).stem}:{k}", role_map) for k, r in enumerate(records)]
    rows = rows[::-1]  # rank order differs from input order
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "rank": pa.array(range(len(rows)), pa.int64()),
            "evol_score": [float(len(rows) - i) for i in range(len(rows))],
            "seq": pa.array(range(100, 100 + len(rows)), pa.int64()),
            "messages": pa.array(
                [r["messages"] for r in rows], CANONICAL_SCHEMA.field("messages").type
            ),
            "source": ["pool.jsonl"] * len(rows),
            "format": ["messages"] * len(rows),
            "extra": pa.array([r["extra"] for r in rows], pa.large_string()),
        }
    )
    (out / "select").mkdir(parents=True)
    # Two parts, the second holding the better ranks: the export follows rank, not files.
    pq.write_table(table.slice(len(rows) // 2), out / "select" / "part-00000.parquet")
    pq.write_table(table.slice(0, len(rows) // 2), out / "select" / "part-00001.parquet")
    return rows


@pytest.fixture(scope="module")
def exported(ray_local, shared_data, tmp_path_factory):
    """A selection exported by the pipeline's export stage (all three formats)."""
    from deita_ray import pipeline

    out = tmp_path_factory.mktemp("export_job")
    rows = _selection(out, shared_data)
    cfg = load_config(
        data={
            "output": {"dir": str(out)},
            "stages": ["export"],
            "export": {"formats": list(EXPORT_FORMATS), "name": "mine"},
        }
    )
    report = pipeline.run(cfg)
    return {"out": out, "rows": rows, "report": report}


def test_export_stage_files_and_accounting(exported):
    out, rows = exported["out"], exported["rows"]
    entry = exported["report"]["stages"]["export"]
    assert entry["rows_in"] == len(rows)
    assert entry["rejected_by_reason"] == {"not_alpaca_shape": 2}
    assert entry["rows_out"] == len(rows) - 2
    assert entry["metrics"]["written"] == {
        "sharegpt": len(rows),
        "messages": len(rows),
        "alpaca": len(rows) - 2,
    }
    assert entry["metrics"]["llamafactory_skips"] == 2
    assert entry["metrics"]["extra_fields_retyped"] == {f: RETYPED for f in EXPORT_FORMATS}
    for fmt in EXPORT_FORMATS:
        lines = (out / "export" / f"{fmt}.jsonl").read_text().splitlines()
        ids = [json.loads(line)["id"] for line in lines]
        refused = ("odd-shape", "no-reply") if fmt == "alpaca" else ()
        assert ids == [r["id"] for r in rows if r["id"] not in refused]  # rank order
    info = json.loads((out / "export" / "dataset_info.json").read_text())
    assert sorted(info) == ["mine_alpaca", "mine_messages", "mine_sharegpt"]
    assert {info[f"mine_{f}"]["file_name"] for f in EXPORT_FORMATS} == {
        f"{f}.jsonl" for f in EXPORT_FORMATS
    }
    rej = pq.read_table(out / "rejects" / "export" / "part-alpaca.parquet").to_pylist()
    assert sorted(r["id"] for r in rej) == ["no-reply", "odd-shape"]
    assert all(r["reason"] == "not_alpaca_shape" and r["stage"] == "export" for r in rej)
    assert json.loads(rej[0]["raw"])["messages"]  # the row itself, nothing lost
    html = (out / "report.html").read_text()
    assert "not_alpaca_shape" in html


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_ingest_reads_an_export_back_to_the_same_rows(exported, tmp_path, fmt):
    from deita_ray.stages.ingest import run_ingest

    cfg = PipelineConfig()
    cfg.input.paths = [str(exported["out"] / "export" / f"{fmt}.jsonl")]
    res = run_ingest(cfg, str(tmp_path))
    assert res.counts.rows_rejected == 0
    back = pq.read_table(tmp_path / "ingest").to_pylist()
    want = [
        r for r in exported["rows"] if fmt != "alpaca" or r["id"] not in ("odd-shape", "no-reply")
    ]
    assert len(back) == len(want)
    for got, row in zip(back, want, strict=True):
        # Fields of mixed types come back as the JSON text they were written as.
        extra = {
            k: json.dumps(v, ensure_ascii=False) if k in RETYPED else v
            for k, v in json.loads(row["extra"]).items()
        }
        assert _same(got, dict(row, extra=json.dumps(extra))), (fmt, row["id"])
        assert got["format"] == fmt


def test_cli_exports_one_format(exported, tmp_path):
    dest = tmp_path / "for_llamafactory"
    proc = subprocess.run(
        [sys.executable, "-m", "deita_ray.export", str(exported["out"]), "--to", "alpaca",
         "--dest", str(dest)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["written"] == {"alpaca": len(exported["rows"]) - 2}
    assert sorted(p.name for p in dest.iterdir()) == ["alpaca.jsonl", "dataset_info.json"]
    assert (dest / "alpaca.jsonl").read_text() == (
        exported["out"] / "export" / "alpaca.jsonl"
    ).read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "deita_ray.export", str(tmp_path), "--to", "sharegpt"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "needs the selection" in bad.stderr


def test_datasets_loads_the_parquet_selection_and_the_exports(exported, tmp_path):
    datasets = pytest.importorskip("datasets", reason="pip install -e '.[dev]'")
    out, rows = exported["out"], exported["rows"]
    cache = str(tmp_path / "hf_cache")
    sel = datasets.load_dataset(
        "parquet", data_files=str(out / "select" / "*.parquet"), split="train", cache_dir=cache
    )
    by_id = {r["id"]: r for r in sel}
    assert set(by_id) == {r["id"] for r in rows}
    for row in rows:
        assert by_id[row["id"]]["messages"] == row["messages"]  # list of {role, content}
    feature = sel.features["messages"]
    inner = feature.feature if hasattr(feature, "feature") else feature[0]
    assert set(inner) == {"role", "content"}
    for fmt, column in (("sharegpt", "conversations"), ("messages", "messages")):
        ds = datasets.load_dataset(
            "json", data_files=str(out / "export" / f"{fmt}.jsonl"), split="train",
            cache_dir=cache,
        )  # fmt: skip
        assert ds.num_rows == len(rows) and column in ds.column_names


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_every_export_loads_as_one_table(exported, tmp_path, fmt):
    """pyarrow.json and datasets read each file whole (mixed-type extras made one type), and
    LLaMA-Factory's dataset_info.json entry names the file and the columns it holds."""
    import pyarrow.json as pj

    datasets = pytest.importorskip("datasets", reason="pip install -e '.[dev]'")
    out = exported["out"] / "export"
    path = out / f"{fmt}.jsonl"
    table = pj.read_json(path)
    n = len(exported["rows"]) - (2 if fmt == "alpaca" else 0)
    assert table.num_rows == n
    assert table.schema.field("tags").type == pa.string()  # ["seed", 0] as its JSON text
    tags = dict(zip(table["id"].to_pylist(), table["tags"].to_pylist(), strict=True))
    assert json.loads(tags["tags-mixed"]) == ["seed", 0]
    assert table.schema.field("meta").type == pa.string()
    ds = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf_cache")
    )
    assert ds.num_rows == n and ds["id"] == table["id"].to_pylist()
    entry = json.loads((out / "dataset_info.json").read_text())[f"mine_{fmt}"]
    assert entry["file_name"] == path.name
    columns = set(entry["columns"].values())
    assert columns <= set(table.column_names), (columns, table.column_names)
    if entry["formatting"] == "sharegpt":  # the tags LLaMA-Factory reads the turns by
        tags = entry["tags"]
        turn = table[entry["columns"]["messages"]][0].as_py()[0]
        assert set(turn) == {tags["role_tag"], tags["content_tag"]}
        roles = {
            m[tags["role_tag"]] for r in table[entry["columns"]["messages"]].to_pylist() for m in r
        }
        assert roles <= {tags["user_tag"], tags["assistant_tag"], tags["system_tag"]}

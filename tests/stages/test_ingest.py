"""The ingest stage on real public data, on an adversarial corpus and on the demo pool (real Ray)."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from proc_utils import kill_tree

from deita_ray.config import PipelineConfig, load_config
from deita_ray.data.demo import demo_records, write_demo_pool
from deita_ray.data.formats import extract_turns
from deita_ray.data.read import READ_SCHEMA, SEQ_FILE_SHIFT, expand_paths, id_prefixes
from deita_ray.data.rejects import REJECTS_SCHEMA
from deita_ray.pipeline import read_manifest, run
from deita_ray.stages.ingest import (
    FILES_DIR,
    MARKED_SCHEMA,
    Canonicalize,
    finished_files,
    part_rank,
    run_ingest,
)


def ingest(paths, out: Path, **input_fields):
    cfg = PipelineConfig()
    cfg.input.paths = [str(p) for p in paths] if isinstance(paths, list) else [str(paths)]
    for k, v in input_fields.items():
        setattr(cfg.input, k, v)
    res = run_ingest(cfg, str(out))
    return res, read_dir(out / "ingest"), read_dir(out / "rejects" / "ingest")


def read_dir(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def readme_counts(shared: Path) -> dict[str, int]:
    """Record counts of the summary table of ../shared/data/README.md."""
    counts = {}
    for line in (shared / "README.md").read_text().splitlines():
        m = re.match(r"^\| `([^`]+)` \| ([\d,]+) \|", line)
        if m:
            counts[m.group(1)] = int(m.group(2).replace(",", ""))
    assert len(counts) >= 20, "README summary table not found"
    return counts


def test_canonicalize_batch_columns_and_marks():
    recs = [
        json.dumps({"id": "x1", "instruction": "q", "output": "a", "k": 1}),
        json.dumps({"instruction": "q"}),
        "garbage",
        '{"messages": [{"role": "user", "content": "bad \\ud800 surrogate"}]}',
        json.dumps({"conversations": [{"from": "human", "value": "hi"}]}),
    ]
    batch = pa.Table.from_pylist(
        [
            {"record": r, "source": "/p/pool.jsonl", "index": i, "seq": (3 << SEQ_FILE_SHIFT) + i,
             "error": "invalid_json" if r == "garbage" else None, "detail": None}
            for i, r in enumerate(recs)
        ],
        schema=READ_SCHEMA,
    )  # fmt: skip
    out = Canonicalize()(batch)
    assert out.schema == MARKED_SCHEMA
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == ["x1", "pool:1", "pool:2", "pool:3", "pool:4"]
    assert [r["_reject_reason"] for r in rows] == [
        None, "missing_field", "invalid_json", "invalid_utf8", None,
    ]  # fmt: skip
    assert rows[0]["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert json.loads(rows[0]["extra"]) == {"k": 1} and rows[0]["format"] == "alpaca"
    assert rows[0]["_raw"] is None and rows[1]["_raw"] == recs[1]
    assert rows[4]["messages"] == [{"role": "user", "content": "hi"}]  # reply "" is fine
    assert [r["seq"] for r in rows] == [(3 << SEQ_FILE_SHIFT) + i for i in range(5)]
    with pytest.raises(ValueError):
        Canonicalize(role_map={"tool": "function"})


# ---------------------------------------------------------------------------------------------
# Real public data


@pytest.fixture(scope="module")
def shared_run(ray_local, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest_shared")
    res, good, rej = ingest(shared_data, out)
    return res, good, rej


def by_file(rows: list[dict], shared: Path) -> Counter:
    return Counter(str(Path(r["source"]).relative_to(shared)) for r in rows)


def test_every_shared_file_is_accounted(shared_run, shared_data):
    res, good, rej = shared_run
    want = readme_counts(shared_data)
    out_n, rej_n = by_file(good, shared_data), by_file(rej, shared_data)
    for name, n in want.items():
        assert out_n[name] + rej_n[name] == n, (name, out_n[name], rej_n[name], n)
    assert set(out_n) | set(rej_n) <= set(want)
    c = res.counts
    assert c.rows_in == sum(want.values()) == c.rows_out + c.rows_rejected
    assert c.rows_out == len(good) and c.rows_rejected == len(rej)
    assert Counter(r["reason"] for r in rej) == Counter(c.rejected_by_reason)
    assert len({r["id"] for r in good}) == len(good)  # ids are unique downstream
    assert "duplicate_id" not in c.rejected_by_reason
    assert res.metrics["by_format"] == dict(sorted(Counter(r["format"] for r in good).items()))


def test_shared_files_expectations(shared_run, shared_data):
    res, good, rej = shared_run
    out_n, rej_n = by_file(good, shared_data), by_file(rej, shared_data)
    reasons = Counter((str(Path(r["source"]).relative_to(shared_data)), r["reason"]) for r in rej)
    rows = {}
    for r in good:
        rows.setdefault(str(Path(r["source"]).relative_to(shared_data)), []).append(r)

    def fmt(name):
        return Counter(r["format"] for r in rows[name])

    for name, n, f in [
        ("alpaca/alpaca_data.json", 2000, "alpaca"),
        ("alpaca/alpaca_5000.json", 5000, "alpaca"),
        ("llama_factory/alpaca_en_demo.json", 999, "alpaca"),
        ("llama_factory/lima.json", 1029, "alpaca"),
        ("alpaca/seed_tasks.jsonl", 175, "self_instruct"),
        ("gpt4_llm/user_oriented_instructions.jsonl", 252, "self_instruct"),
        ("fastchat/dummy_conversation.json", 500, "sharegpt"),
        ("llama_factory/dpo_en_demo.json", 300, "sharegpt"),
        ("llama_factory/kto_en_demo.json", 300, "messages"),
        ("hh_rlhf/harmless-base/test.jsonl.gz", 2312, "hh"),
        ("alpaca_eval/results/gpt4_1106_preview/model_outputs.json", 805, "alpaca"),
        ("alpaca_eval/results/text_davinci_003/model_outputs.json", 805, "alpaca"),
    ]:
        assert out_n[name] == n and rej_n[name] == 0 and fmt(name) == {f: n}, name
    # LIMA: 29 multi-turn rows through `history`
    lima = rows["llama_factory/lima.json"]
    assert sum(len(extract_turns(r["messages"])) > 1 for r in lima) == 29
    # own ids are kept; others are <file stem>:<index>
    assert {r["id"] for r in rows["fastchat/dummy_conversation.json"]} == {
        f"identity_{i}" for i in range(500)
    }
    assert {r["id"] for r in rows["alpaca/alpaca_data.json"]} == {
        f"alpaca_data:{i}" for i in range(2000)
    }
    # system prompts of the DPO demo survive as system messages; chosen/rejected stay in extra
    dpo = rows["llama_factory/dpo_en_demo.json"]
    assert sum(r["messages"][0]["role"] == "system" for r in dpo) == 80
    assert all({"chosen", "rejected"} <= set(json.loads(r["extra"])) for r in dpo)
    assert all("label" in json.loads(r["extra"]) for r in rows["llama_factory/kto_en_demo.json"])
    # glaive tool calls: rejected by default with their own reason, the rest accepted
    glaive = json.loads((shared_data / "llama_factory/glaive_toolcall_en_demo.json").read_text())
    tool = sum(any(m["from"] not in ("human", "gpt") for m in r["conversations"]) for r in glaive)
    name = "llama_factory/glaive_toolcall_en_demo.json"
    assert reasons[(name, "unsupported_role")] == tool == rej_n[name] and out_n[name] == 300 - tool
    # preference judgments without an `output` and prompt-only evaluation files are rejected
    for name in ("alpaca_eval/results/zephyr-7b-beta/alpaca_eval_gpt4/annotations.json",
                 "alpaca_eval/results/alpaca-farm-ppo-human/alpaca_eval_gpt4/annotations.json"):  # fmt: skip
        assert reasons[(name, "missing_field")] == 805
    for name in ("gpt4_llm/vicuna_question_80.jsonl", "fastchat/llm_judge/mt_bench/question.jsonl",
                 "fastchat/llm_judge/judge_prompts.jsonl"):  # fmt: skip
        assert out_n[name] == 0 and reasons[(name, "unknown_format")] == rej_n[name] > 0
    # two question.jsonl files: their synthesized ids differ by folder
    ids = {r["id"] for r in rej if r["source"].endswith("question.jsonl")}
    assert "mt_bench/question:0" in ids and "vicuna_bench/question:0" in ids


def test_shared_rows_are_lossless(shared_run, shared_data):
    _, good, _ = shared_run
    for name in ("alpaca/alpaca_data.json", "llama_factory/lima.json"):
        original = json.loads((shared_data / name).read_text())
        mine = sorted((r for r in good if r["source"].endswith(name)), key=lambda r: r["seq"])
        assert len(mine) == len(original)
        for rec, row in zip(original, mine, strict=True):
            msgs = [(m["role"], m["content"]) for m in row["messages"]]
            hist = [
                x
                for pair in rec.get("history", [])
                for x in zip(("user", "assistant"), pair, strict=True)
            ]
            user = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
            assert msgs == [*hist, ("user", user), ("assistant", rec["output"])]
            extra = json.loads(row["extra"])
            assert extra == {
                k: v
                for k, v in rec.items()
                if k not in ("instruction", "input", "output", "history")
            }


def test_glaive_tool_roles_accepted_with_role_map(ray_local, shared_data, tmp_path):
    path = shared_data / "llama_factory/glaive_toolcall_en_demo.json"
    res, good, rej = ingest(
        path, tmp_path, role_map={"function_call": "assistant", "observation": "user"}
    )
    assert (res.counts.rows_in, res.counts.rows_out, res.counts.rows_rejected) == (300, 300, 0)
    assert res.metrics["multi_turn_rows"] > 150
    assert all("tools" in json.loads(r["extra"]) for r in good)


# ---------------------------------------------------------------------------------------------
# Adversarial corpus


def alp(i, **kw):
    return {"instruction": f"question {i}", "input": "", "output": f"answer {i}", **kw}


def build_corpus(root: Path) -> tuple[int, Counter, int]:
    """Write the corpus; return (records, expected rejects by reason, expected accepted)."""
    root.mkdir(parents=True, exist_ok=True)
    expect: Counter = Counter()
    good = 0
    # a: JSON array truncated inside its 6th element
    arr = json.dumps([alp(i) for i in range(6)])
    (root / "a_array.json").write_text(arr[: arr.rindex('{"instruction"') + 25])
    good += 5
    expect["invalid_json"] += 1
    # b: JSON lines of mixed formats, the last line truncated
    lines = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": ""}]},  # empty reply is allowed
        {"instruction": "who", "context": "Ada did", "response": "Ada", "category": "qa"},
        alp(7, history=[["before", "reply"]], system="sys"),
    ]  # fmt: skip
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"instruction": "cut", "outp'
    (root / "b_lines.jsonl").write_text(text)
    good += 4
    expect["invalid_json"] += 1
    # c: every kind of bad record, duplicate ids, non-UTF-8 and huge lines
    bad = [
        ({"messages": [{"role": "user", "content": ["a", "list"]}]}, "wrong_type"),
        ({"instruction": 5, "output": "x"}, "wrong_type"),
        ({"conversations": []}, "empty_conversation"),
        ({"conversations": [{"from": "human", "value": "  \n "}, {"from": "gpt", "value": "x"}]},
         "empty_instruction"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
         "consecutive_user_turns"),
        ({"instruction": "no output"}, "missing_field"),
        ({"conversations": [{"value": "no role"}]}, "missing_field"),
        ({"prompt": "?", "completion": "!"}, "unknown_format"),
        ([1, 2, 3], "not_an_object"),
        ({"messages": [{"role": "tool", "content": "{}"}]}, "unsupported_role"),
        ({"id": "dup-1", **alp(10)}, None),
        ({"id": "dup-1", **alp(11)}, "duplicate_id"),
        ({"id": "dup-1", "conversations": [{"from": "human", "value": "x"}]}, "duplicate_id"),
        ({"id": "dup-2", **alp(12)}, None),  # also in the Parquet file, which comes later
        ({"id": "a_array:0", **alp(13)}, "duplicate_id"),  # same as a synthesized id, earlier
        ({"id": 77, **alp(14)}, None),  # integer id -> "77"
    ]  # fmt: skip
    raw_lines = [json.dumps(r).encode() for r, _ in bad]
    raw_lines.append(b'{"instruction": "caf\xe9 latin-1", "output": "x"}')  # not UTF-8
    raw_lines.append(json.dumps(alp(15, output="y" * 100_000)).encode())  # huge
    raw_lines.append(b'{"instruction": "lone \\ud800 escape", "output": "x"}')  # unpaired surrogate
    (root / "c_bad.jsonl").write_bytes(b"\n".join(raw_lines) + b"\n")
    for _, reason in bad:
        if reason:
            expect[reason] += 1
        else:
            good += 1
    expect["invalid_utf8"] += 2
    expect["record_too_large"] += 2  # 100 KB: two pieces of at most 64 KiB
    # d: Parquet, one id colliding with an earlier file
    pq.write_table(pa.Table.from_pylist([{"id": "dup-2", **alp(20)}, {"id": "p1", **alp(21)}]),
                   root / "d_table.parquet")  # fmt: skip
    good += 1
    expect["duplicate_id"] += 1
    # e: gzip JSON lines; f: array with non-UTF-8 bytes in one element; g: corrupt gzip
    with gzip.open(root / "e_lines.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(alp(30 + i)) for i in range(3)))
    good += 3
    (root / "f_array.json").write_bytes(
        b'[{"instruction": "ok", "output": "fine"}, {"instruction": "\xff\xfe", "output": "x"}]'
    )
    good += 1
    expect["invalid_utf8"] += 1
    (root / "g_corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data")
    expect["unreadable_file"] += 1
    total = good + sum(expect.values())
    return total, expect, good


@pytest.fixture(scope="module")
def adversarial(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("adv")
    n, expect, good = build_corpus(root / "pool")
    first = ingest(root / "pool", root / "out1", max_record_bytes=8192)  # a directory
    second = ingest([str(root / "pool" / "*.*")], root / "out2", max_record_bytes=8192)  # a glob
    return n, expect, good, first, second


def test_adversarial_corpus_counts(adversarial):
    n, expect, good_n, (res, good, rej), _ = adversarial
    c = res.counts
    assert (c.rows_in, c.rows_out) == (n, good_n)
    assert Counter(c.rejected_by_reason) == expect
    assert Counter(r["reason"] for r in rej) == expect
    assert len(good) == good_n and len({r["id"] for r in good}) == good_n
    for r in rej:  # every reject keeps its raw text and source
        assert r["raw"] is not None and r["source"] and r["id"]
    for r in rej:  # reader rejects also say where they are in their file
        if r["reason"] != "duplicate_id" and not r["source"].endswith(".gz"):
            data = Path(r["source"]).read_bytes()[r["range_start"] : r["range_end"]]
            assert r["range_unit"] == "bytes" and r["raw"] == data.decode(
                "utf-8", "backslashreplace"
            )
    assert res.metrics["bytes_read"] == sum(
        p.stat().st_size for p in Path(rej[0]["source"]).parent.iterdir()
    )
    rejects_file = next(Path(rej[0]["source"]).parents[1].glob("out1/rejects/ingest/*.parquet"))
    assert pq.read_schema(rejects_file) == REJECTS_SCHEMA
    ids = {r["id"]: r for r in good}
    # first occurrence in input order keeps a duplicated id
    assert ids["dup-1"]["messages"][0]["content"] == "question 10"
    assert ids["dup-2"]["source"].endswith("c_bad.jsonl")
    assert ids["a_array:0"]["source"].endswith("a_array.json")
    assert "77" in ids and json.loads(ids["77"]["extra"]) == {"id": 77}
    dup_raw = [json.loads(r["raw"]) for r in rej if r["reason"] == "duplicate_id"]
    assert {d["id"] for d in dup_raw} == {"dup-1", "dup-2", "a_array:0"}
    assert all(d["messages"] for d in dup_raw)


def test_adversarial_ids_stable_across_runs(adversarial):
    *_, (res1, good1, rej1), (res2, good2, rej2) = adversarial
    assert res1.counts.to_dict() == res2.counts.to_dict()
    key = lambda r: r["seq"]  # noqa: E731
    assert sorted(good1, key=key) == sorted(good2, key=key)
    assert sorted((r["id"], r["reason"]) for r in rej1) == sorted(
        (r["id"], r["reason"]) for r in rej2
    )


# ---------------------------------------------------------------------------------------------
# Demo pool


def test_demo_pool_is_deterministic_and_varied(tmp_path):
    n = write_demo_pool(str(tmp_path / "a.jsonl"))
    write_demo_pool(str(tmp_path / "b.jsonl"))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert 250 <= n <= 350
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == n == len(demo_records())
    short = sum(len(line) < 400 for line in lines)
    assert short > 0.7 * n


def test_demo_pool_ingest(ray_local, tmp_path):
    cfg = PipelineConfig()
    cfg.demo_pool = True
    res = run_ingest(cfg, str(tmp_path))
    n = len(demo_records())
    c = res.counts
    assert c.rows_in == n == c.rows_out + c.rows_rejected
    assert 5 <= c.rows_rejected <= 20 and len(c.rejected_by_reason) >= 8
    assert set(res.metrics["by_format"]) >= {"alpaca", "sharegpt", "messages", "dolly"}
    assert res.metrics["multi_turn_rows"] >= 20
    good = read_dir(tmp_path / "ingest")
    # planted near-duplicates: several instructions are paraphrases of the same seed
    firsts = [r["messages"][0]["content"] if r["messages"][0]["role"] == "user" else r["messages"][1]["content"]
              for r in good]  # fmt: skip
    assert (
        sum(
            f.startswith(("Can you tell me:", "Please answer briefly.", "Quick question"))
            for f in firsts
        )
        >= 30
    )


def test_pool_of_only_rejects_and_missing_input(ray_local, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n[1]\n{"instruction": "q"\n')
    res, good, rej = ingest(tmp_path / "bad.jsonl", tmp_path / "out")
    assert (res.counts.rows_in, res.counts.rows_out, len(rej), good) == (3, 0, 3, [])
    assert res.metrics["by_format"] == {} and res.metrics["turns"] == 0
    with pytest.raises(FileNotFoundError):
        ingest(tmp_path / "nothing-*.json", tmp_path / "out2")


# ---------------------------------------------------------------------------------------------
# Damaged files: what decodes is kept, the rest is rejected with its range, and rows in are
# counted by the reader apart from what is written


def test_damaged_files_keep_what_decodes_and_count_rows_in_apart(ray_local, tmp_path):
    import zlib

    pool = tmp_path / "pool"
    pool.mkdir()
    recs = [alp(i, input=f"context {i} " * (i % 5)) for i in range(300)]
    # a: JSON lines .gz cut at 80% (a partial download)
    gz = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in recs), mtime=0)
    cut = gz[: len(gz) * 4 // 5]
    (pool / "a_part.jsonl.gz").write_bytes(cut)
    stream = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut)
    complete = stream.count(b"\n")
    # b: a JSON array .json.gz cut in its middle
    arr_gz = gzip.compress(json.dumps(recs[:100]).encode(), mtime=0)
    (pool / "b_array.json.gz").write_bytes(arr_gz[: len(arr_gz) // 2])
    arr_stream = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(arr_gz[: len(arr_gz) // 2])
    arr_complete = sum(json.dumps(r).encode() in arr_stream for r in recs[:100])
    # c: Parquet with a corrupt page in its second row group (10 rows each)
    table = pa.Table.from_pylist([{"id": f"p{i}", **alp(i)} for i in range(30)])
    pq.write_table(
        table, pool / "c_table.parquet", row_group_size=10, compression="none",
        write_page_checksum=True,
    )  # fmt: skip
    col = pq.ParquetFile(pool / "c_table.parquet").metadata.row_group(1).column(1)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray((pool / "c_table.parquet").read_bytes())
    data[start + col.total_compressed_size - 12 : start + col.total_compressed_size - 4] = b"\0" * 8
    (pool / "c_table.parquet").write_bytes(bytes(data))

    res, good, rej = ingest(pool, tmp_path / "out")
    c = res.counts
    by_source = Counter(Path(r["source"]).name for r in good)
    assert by_source == {
        "a_part.jsonl.gz": complete,  # main kept 0 of them
        "b_array.json.gz": arr_complete,
        "c_table.parquet": 20,  # main lost the third row group without a trace
    }
    reasons = Counter((Path(r["source"]).name, r["reason"]) for r in rej)
    assert reasons == {
        ("a_part.jsonl.gz", "truncated_file"): 1,
        ("b_array.json.gz", "truncated_file"): 1,
        ("c_table.parquet", "unreadable_row_group"): 10,
    }
    assert c.rows_in == complete + arr_complete + 20 + 1 + 1 + 10 == c.rows_out + c.rows_rejected
    assert res.metrics["bytes_read"] == sum(p.stat().st_size for p in pool.iterdir())
    tails = {Path(r["source"]).name: r for r in rej if r["reason"] == "truncated_file"}
    tail = tails["a_part.jsonl.gz"]
    assert (tail["range_start"], tail["range_end"], tail["range_unit"]) == (
        stream.rindex(b"\n") + 1,
        len(stream.rstrip()),
        "decompressed_bytes",
    )  # fmt: skip (a record's range leaves out whitespace around it)
    assert tail["raw"] == stream[tail["range_start"] :].rstrip().decode()
    lost = sorted(
        (r["range_start"], r["range_end"], r["range_unit"], json.loads(r["raw"]))
        for r in rej
        if r["reason"] == "unreadable_row_group"
    )  # each row of the damaged group, with the columns that still decode ("instruction" not)
    assert lost == [
        (i, i + 1, "rows", {"id": f"p{i}", "input": "", "output": f"answer {i}"})
        for i in range(10, 20)
    ]


# ---------------------------------------------------------------------------------------------
# Resume by input file

RESUME_FILES = 6
RESUME_ROWS = 20_000  # per file: one CPU takes a while on each, so a kill lands between files


def write_resume_pool(root: Path) -> list[Path]:
    """Six JSON-lines files with one bad line each and own ids repeated across files.

    Row 1 of file k has id ``ring-k`` and row 2 repeats ``ring-(k+1)``: every ``ring`` id
    first occurs in the file before its own, and ``ring-0`` again in the last file, so a
    duplicate id can have its first occurrence in a kept file and the later one in a file
    read again after the resume, or both in kept files whose duplicates were never fixed.
    """
    root.mkdir(parents=True)
    paths = []
    for k in range(RESUME_FILES):
        rows = [alp(k * RESUME_ROWS + i) for i in range(RESUME_ROWS)]
        rows[1]["id"] = f"ring-{k}"
        rows[2]["id"] = f"ring-{(k + 1) % RESUME_FILES}"
        lines = [json.dumps(r) for r in rows]
        lines.insert(5, '{"instruction": "broken')
        path = root / f"part{k}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def _rows_by_seq(folder: Path) -> list[dict]:
    return sorted(read_dir(folder), key=lambda r: (r["seq"], r.get("reason") or ""))


def _part_stats(out: Path, ranks) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
        for folder in (out / "ingest", out / "rejects" / "ingest")
        for p in folder.glob("*.parquet")
        if part_rank(str(p)) in ranks
    }


def test_killed_ingest_resumes_by_file_and_equals_an_uninterrupted_run(ray_local, tmp_path):
    pool = tmp_path / "pool"
    write_resume_pool(pool)
    ref_res, ref_good, ref_rej = ingest(pool, tmp_path / "ref")
    assert ref_res.counts.rejected_by_reason == {
        "invalid_json": RESUME_FILES,
        "duplicate_id": RESUME_FILES,
    }

    out = tmp_path / "cut"
    job = {
        "stages": ["ingest"],
        "input": {"paths": [str(pool)]},
        "output": {"dir": str(out)},
        "ray": {"num_cpus": 1},  # one read task at a time: files finish one after the other
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    proc = subprocess.Popen(
        [sys.executable, "-m", "deita_ray.pipeline", "--config", str(tmp_path / "job.yaml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ends = out / "ingest" / FILES_DIR
    try:
        deadline = time.time() + 600
        while not (ends.is_dir() and any(ends.glob("r*.json"))):
            assert proc.poll() is None, "the driver ended before any file was finished"
            assert time.time() < deadline, "no input file was finished in time"
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    assert read_manifest(str(out))["stages"]["ingest"]["status"] == "running"
    files = expand_paths([str(pool)])
    kept = finished_files(str(out), files, id_prefixes(files))
    assert 1 <= len(kept) < RESUME_FILES, f"killed with {len(kept)} files finished"
    before = _part_stats(out, kept)
    # A finished file must not be read again: blanked (same size, no record left), it would
    # lose its rows if it were.
    for rank in kept:
        Path(files[rank]).write_text(" " * Path(files[rank]).stat().st_size)

    report = run(load_config(data=job))
    entry = report["stages"]["ingest"]
    assert entry["metrics"]["files_resumed"] == len(kept)
    assert (entry["rows_in"], entry["rows_out"], entry["rejected_by_reason"]) == (
        ref_res.counts.rows_in,
        ref_res.counts.rows_out,
        ref_res.counts.rejected_by_reason,
    )
    assert _rows_by_seq(out / "ingest") == sorted(ref_good, key=lambda r: r["seq"])
    assert _rows_by_seq(out / "rejects" / "ingest") == sorted(
        ref_rej, key=lambda r: (r["seq"], r["reason"])
    )
    # Kept parts are the same files; only a duplicate-id fix may have rewritten one.
    after = _part_stats(out, kept)
    assert set(before) <= set(after)
    untouched = [
        p for p in before if not (out / "rejects" / "ingest" / f"dup-{Path(p).name}").exists()
    ]
    assert untouched and all(after[p] == before[p] for p in untouched)


def test_resume_rereads_files_whose_parts_do_not_add_up(ray_local, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for k in range(3):
        rows = [alp(10 * k + i, id=f"k{k}-{i}") for i in range(10)]
        rows[3]["id"] = "same"  # first in file 0, then in files 1 and 2
        (pool / f"f{k}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ref, ref_good, ref_rej = ingest(pool, tmp_path / "ref")
    out = tmp_path / "out"
    ingest(pool, out)
    parts = sorted((out / "ingest").glob("*.parquet"))
    assert {part_rank(str(p)) for p in parts} == {0, 1, 2}
    # File 1's end-of-file record is missing (killed before it was written); one of file 2's
    # parts is missing (written by a task that never ran again); a temporary file was left.
    (out / "ingest" / FILES_DIR / "r0000001.json").unlink()
    next(p for p in parts if part_rank(str(p)) == 2).unlink()
    (out / "ingest" / ".tmp-part-r0000002-i0000000000000.parquet").write_bytes(b"half")
    res, good, rej = ingest(pool, out)
    assert res.metrics["files_resumed"] == 1
    assert res.metrics["bytes_read"] == ref.metrics["bytes_read"]
    assert res.counts.to_dict() == ref.counts.to_dict()
    assert sorted(good, key=lambda r: r["seq"]) == sorted(ref_good, key=lambda r: r["seq"])
    assert sorted((r["id"], r["seq"], r["reason"]) for r in rej) == sorted(
        (r["id"], r["seq"], r["reason"]) for r in ref_rej
    )
    assert not list((out / "ingest").glob(".tmp-*"))
    # A file whose size changed since it was read is read again, the others are kept.
    with open(pool / "f0.jsonl", "a") as f:
        f.write(json.dumps(alp(99, id="k0-new")) + "\n")
    res, good, _ = ingest(pool, out)
    assert res.metrics["files_resumed"] == 2
    assert res.counts.rows_out == ref.counts.rows_out + 1 and "k0-new" in {r["id"] for r in good}


# A Ray worker as the flaky CI failure met it: Arrow's pools sized by OMP_NUM_THREADS=1, a first
# group_by fixing Acero's per-process thread-index capacity (CPU + IO pool + 1 = 10, a C++
# static), then a Ray Data Parquet read task in the same reused worker raising the CPU pool to
# 32 threads (ParquetFileReader calls pa.set_cpu_count(32)). Every grouping the project does
# runs afterwards, 20 times each, and must give the single-threaded answer.
_RESIZED_POOL_SCRIPT = r"""
import json
from collections import Counter

import pyarrow as pa

pa.set_cpu_count(1)
pa.set_io_thread_count(8)
pa.table({"id": ["a"], "seq": [0]}).group_by("id").aggregate([("seq", "count")])
pa.set_cpu_count(32)

from deita_ray.report.html import source_table
from deita_ray.stages.ingest import _reduce_bucket
from deita_ray.report.sections.select import why_not

# 64 parts of 2,000 (id, seq, part) rows; ids repeat across parts.
buckets = [
    pa.table({
        "id": [f"k{(p * 2000 + i) % 4099}" for i in range(2000)],
        "seq": pa.array(range(p * 2000, (p + 1) * 2000), pa.int64()),
        "part": pa.array([p] * 2000, pa.int32()),
    })
    for p in range(64)
]
keys = pa.concat_tables(buckets)
threaded_failures = 0
for _ in range(50):
    try:
        keys.group_by("id").aggregate([("seq", "min"), ("seq", "count")])
    except pa.ArrowIndexError:
        threaded_failures += 1

reduced = []
for _ in range(20):
    dups, parts = _reduce_bucket(*buckets)
    reduced.append([sorted(zip(*dups.to_pydict().values())), parts])

statuses = ["selected", "similar_to_selected", "not_reached"]
decisions = pa.concat_tables([
    pa.table({
        "status": [statuses[(p + i) % 3] for i in range(2000)],
        "rejected_by": [f"s{i % 7}" if (p + i) % 3 == 1 else None for i in range(2000)],
        "cosine": [0.95] * 2000,
    })
    for p in range(64)
])
rows = decisions.select(["status"]).append_column(
    "source", pa.array([f"f{i % 5}.jsonl" for i in range(decisions.num_rows)])
)
reports = [why_not(decisions, {}) for _ in range(20)]
sources = [source_table(rows, Counter()) for _ in range(20)]
print(json.dumps({
    "threaded_failures": threaded_failures,
    "reduced": reduced,
    "reports": reports,
    "sources": sources,
}))
"""


def test_group_by_survives_a_resized_arrow_pool():
    out = subprocess.run(
        [sys.executable, "-c", _RESIZED_POOL_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    # The setup provokes Arrow's failure (19 of 20 threaded tries on the 2-core machine); if
    # this stops failing, Arrow fixed ThreadIndexer and use_threads=False may be dropped.
    assert got["threaded_failures"] >= 1
    # Every id k0..k4098 occurs 31 or 32 times over the 128,000 rows; first seq is its index.
    dups, parts = got["reduced"][0]
    assert [d[0] for d in dups] == sorted(f"k{i}" for i in range(4099))
    assert all(d[1] == int(d[0][1:]) for d in dups)
    assert parts == list(range(2, 64))  # seq 0..4098 are first: parts 0 and 1, part of 2
    assert all(r == got["reduced"][0] for r in got["reduced"])
    assert got["reports"][0]["status"] == {
        "selected": 42667,
        "similar_to_selected": 42667,
        "not_reached": 42666,
    }
    assert all(r == got["reports"][0] for r in got["reports"])
    assert sum(s["rows"] for s in got["sources"][0]) == 128_000
    assert all(s == got["sources"][0] for s in got["sources"])

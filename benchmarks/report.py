"""Report benchmark: build a synthetic job output folder and time and size its report.

Writes, with pyarrow directly (no model runs), the outputs of ingest, score and embed for
``n`` rows spread over three source files (texts: real records cycled, short Alpaca ones from
``../shared/data/alpaca/alpaca_5000.json`` or long LIMA answers with ``--texts lima``, or
generated words when the data is absent), rejects of ingest, then runs the real select stage
(exact greedy, numpy) and the real report, once per kind of text. Checks that the page holds every selected row,
then prints and writes ``benchmarks/results/report.json`` (README rows: the size of
``report.html`` and the seconds of the report and the select stage).

``write_job`` is also the fixture of tests/test_report_html.py (small ``n``).

Usage: ``python benchmarks/report.py [--rows 100000] [--budget 5000] [--texts alpaca|lima]
[--out DIR] [--quick]``
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, benchmarks/ is sys.path[0]: its select.py would shadow the stdlib `select`.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pool_a.jsonl", "pool_b.json", "pool_c.parquet")
HOSTILE = '<script>window.__pwned = 1</script></script><!-- <b onmouseover="x()">bold?</b> & co'
"""Text planted in one row and one reject: the page must show it as text."""


TEXTS = {"alpaca": "alpaca/alpaca_5000.json", "lima": "llama_factory/lima.json"}
"""Real texts the rows cycle through: short Alpaca records, or LIMA's long answers."""


def _texts(
    n: int, rng: np.random.Generator, data: Path | None, texts: str = "alpaca"
) -> list[list[dict]]:
    """Messages of ``n`` rows: the records of :data:`TEXTS` cycled (a third of the rows get a
    second turn), or generated sentences when no data folder is given."""
    records = None
    if data is not None and (data / TEXTS[texts]).exists():
        records = json.loads((data / TEXTS[texts]).read_text())
    words = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")

    def turn(k: int) -> tuple[str, str]:
        if records is not None:
            r = records[k % len(records)]
            q = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
            return q, r["output"]
        q = " ".join(rng.choice(words, 12)) + "?"
        return q, " ".join(rng.choice(words, int(rng.integers(20, 120)))) + "."

    out = []
    for i in range(n):
        msgs = []
        for t in range(2 if i % 3 == 0 else 1):
            q, a = turn(7 * i + t)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append(msgs)
    return out


def _write(folder: Path, table: pa.Table, parts: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    step = max(1, -(-table.num_rows // parts))
    for k in range(parts):
        piece = table.slice(k * step, step)
        if piece.num_rows:
            pq.write_table(piece, folder / f"part-{k:05d}.parquet")


def write_job(
    out: Path,
    n: int = 300,
    dim: int = 32,
    budget: int = 40,
    tau: float = 0.9,
    seed: int = 7,
    data: Path | None = None,
    calibrate: bool = True,
    extra_stages: dict | None = None,
    notes: list[str] | None = None,
    texts: str = "alpaca",
) -> dict:
    """Write a synthetic job output folder and its report; returns facts for checks.

    Args:
        extra_stages: stage results added to the report's (e.g. training losses).
        texts: which real texts the rows cycle through (:data:`TEXTS`).
        notes: the report's notes.

    Returns:
        ``{"out", "report", "stages", "ids", "hostile_id", "seconds"}`` and the arrays the
        outputs hold: ``seq``, ``comp``, ``qual`` (per-turn lists), ``evol``, ``emb``.
    """
    from deita_ray.accounting import StageCounts
    from deita_ray.config import PipelineConfig
    from deita_ray.data.formats import CANONICAL_SCHEMA
    from deita_ray.data.rejects import REJECTS_SCHEMA
    from deita_ray.report import write_report
    from deita_ray.stages.select import run_select

    out = Path(out)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    ids = [f"row-{i}" for i in range(n)]
    msgs = _texts(n, rng, data, texts)
    hostile = n // 2
    msgs[hostile][0]["content"] = HOSTILE
    source = [SOURCES[i % 7 % 3] for i in range(n)]  # uneven shares
    canon = {
        "id": pa.array(ids),
        "seq": pa.array(np.arange(n, dtype=np.int64)),
        "messages": pa.array(msgs, CANONICAL_SCHEMA.field("messages").type),
        "source": pa.array(source),
        "format": pa.array(["alpaca"] * n),
        "extra": pa.array(["{}"] * n, pa.large_string()),
    }
    _write(out / "ingest", pa.table(canon, schema=CANONICAL_SCHEMA), 4)

    turns = np.array([len(m) // 2 for m in msgs])
    comp = [list(rng.uniform(1, 6, t)) for t in turns]
    qual = [list(rng.uniform(1, 6, t)) for t in turns]
    evol = np.array([float(np.dot(c, q)) for c, q in zip(comp, qual, strict=True)])
    evol[5] = np.nan
    score = pa.table(
        {
            **canon,
            "complexity_scores": pa.array(comp, pa.list_(pa.float64())),
            "quality_scores": pa.array(qual, pa.list_(pa.float64())),
            "evol_score": pa.array(evol, pa.float64(), from_pandas=True),
            "truncated": pa.array([False] * n),
        }
    )
    _write(out / "score", score, 4)

    # Clusters of near-duplicates: many rows are rejected for similarity.
    centres = rng.normal(size=(max(2, n // 6), dim))
    emb = centres[rng.integers(0, len(centres), n)] + 0.15 * rng.normal(size=(n, dim))
    emb = emb.astype(np.float32)
    embed = pa.table(
        {
            "id": ids,
            "seq": canon["seq"],
            "evol_score": pa.array(evol, from_pandas=True),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(emb.reshape(-1), pa.float32()), dim
            ),
        }
    )
    _write(out / "embed", embed, 4)

    bad = max(3, n // 100)
    reasons = ["invalid_json", "unknown_format", "empty_instruction"]
    raw = [HOSTILE if k == 0 else '{"instruction": ' + "x" * (k % 50) for k in range(bad)]
    rej = pa.Table.from_pylist(
        [
            {
                "seq": 10**12 + k,
                "stage": "ingest",
                "reason": reasons[k % 3],
                "detail": f"line {k}",
                "raw": raw[k],
                "source": SOURCES[k % 3],
                "range_start": 100 * k,
                "range_end": 100 * k + len(raw[k]),
                "range_unit": "bytes",
            }
            for k in range(bad)
        ],
        schema=REJECTS_SCHEMA,
    )
    _write(out / "rejects" / "ingest", rej, 1)
    t_write = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = PipelineConfig()
    cfg.select.tau, cfg.select.budget, cfg.select.device = tau, budget, "numpy"
    cfg.select.calibrate = calibrate
    selected = run_select(cfg, str(out))
    t_select = time.perf_counter() - t0
    by_reason = {r: sum(1 for k in range(bad) if reasons[k % 3] == r) for r in reasons}

    def entry(counts: StageCounts, metrics: dict) -> dict:
        return {
            **counts.to_dict(),
            "seconds": 1.5,
            "rows_per_s": counts.rows_in / 1.5,
            "metrics": metrics,
        }

    stages = {
        "ingest": entry(StageCounts(n + bad, n, by_reason), {"files": 3}),
        "score": entry(StageCounts(n, n), {}),
        "embed": entry(StageCounts(n, n), {"dim": dim}),
        "select": entry(selected.counts, selected.metrics),
    }
    stages.update(extra_stages or {})
    manifest = {"config": {"stages": list(stages)}, "stages": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    t0 = time.perf_counter()
    notes = ["synthetic job (benchmarks/report.py)"] if notes is None else notes
    report = write_report(str(out), stages, notes=notes)
    t_report = time.perf_counter() - t0
    return {
        "out": out,
        "report": report,
        "stages": stages,
        "ids": ids,
        "hostile_id": ids[hostile],
        "seq": np.asarray(canon["seq"]),
        "comp": comp,
        "qual": qual,
        "evol": evol,
        "emb": emb,
        "seconds": {
            "write_outputs": round(t_write, 2),
            "select": round(t_select, 2),
            "report": round(t_report, 2),
        },
    }


def measure(out: Path, args: argparse.Namespace, data: Path | None, texts: str) -> dict:
    """One synthetic job of ``args.rows`` rows: its timings, sizes and self-checks."""
    import resource

    facts = write_job(
        out, n=args.rows, dim=args.dim, budget=args.budget, tau=args.tau, data=data, texts=texts
    )
    html = (out / "report.html").read_text(encoding="utf-8")
    held = json.loads(html.split('id="report-data">', 1)[1].split("</script>", 1)[0])["rows"]
    sel = facts["stages"]["select"]
    held_selected = [
        i for i, st in zip(held["id"], held["status"], strict=True) if st == "selected"
    ]
    checks = {
        # The page holds every selected row (budget <= 10,000) and report.json names them all.
        "page_holds_every_selected_row": sorted(held_selected)
        == sorted(facts["report"]["selected_ids"]),
        "report_names_every_selected_row": len(facts["report"]["selected_ids"]) == sel["rows_out"],
        "page_has_no_raw_markup_in_data": html.count("</script>") == 2,
    }
    plots = sorted((out / "plots").glob("*.png"))
    return {
        "texts": TEXTS[texts] if data is not None else "generated words",
        "selected": sel["rows_out"],
        "not_selected": sel["not_selected_by_reason"],
        "rows_held_by_page": len(held["id"]),
        "seconds": facts["seconds"],
        "report_html_bytes": len(html.encode("utf-8")),
        "report_html_mib": round(len(html.encode("utf-8")) / 2**20, 2),
        "report_json_bytes": (out / "report.json").stat().st_size,
        "plots_bytes": sum(p.stat().st_size for p in plots),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "checks": checks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--budget", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--out", help="keep the last folder here (default: temporary folders)")
    p.add_argument("--data", help="shared data folder (default: ../shared/data)")
    p.add_argument(
        "--texts", choices=sorted(TEXTS), action="append", help="default: every one of them"
    )
    p.add_argument("--quick", action="store_true", help="10K rows, budget 1K, Alpaca texts")
    args = p.parse_args()
    if args.quick:
        args.rows, args.budget, args.texts = 10_000, 1_000, ["alpaca"]
    texts = args.texts or sorted(TEXTS)
    data = Path(args.data or os.environ.get("DEITA_SHARED_DATA") or REPO.parent / "shared" / "data")
    data = data if data.is_dir() else None
    from benchmarks._common import finish, require

    runs = {}
    for kind in texts:
        tmp = tempfile.mkdtemp(prefix="report-bench-")
        out = Path(args.out) if args.out else Path(tmp)
        if args.out and out.exists():
            shutil.rmtree(out)
        try:
            runs[kind] = measure(out, args, data, kind)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        require("report", runs[kind]["checks"], runs[kind])
    rows = [
        {
            "setting": f"{args.rows:,} rows, {runs[k]['selected']:,} selected, {runs[k]['texts']} "
            "texts; real select stage (tau curve on) and report",
            "result": f"report.html {runs[k]['report_html_mib']} MiB holding "
            f"{runs[k]['rows_held_by_page']:,} rows; report "
            f"{runs[k]['seconds']['report']:.0f} s, select {runs[k]['seconds']['select']:.0f} s",
        }
        for k in runs
    ]
    finish(
        "report",
        {
            "quick": args.quick,
            "rows": args.rows,
            "budget": args.budget,
            "runs": runs,
            "readme": rows,
        },
    )


if __name__ == "__main__":
    main()

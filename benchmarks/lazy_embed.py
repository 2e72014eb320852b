"""Benchmark: ``select.lazy_embed`` (embed only what the greedy reads) vs a full embed + select.

For each model (``tiny``: a tiny random LLaMA built on the fly; ``minilm``: the embedded
all-MiniLM-L6-v2), each pool size (``--sizes``, rows of Alpaca, repeated with a numbered
suffix past its 52K rows, with integer scores 0..9: many ties) and each budget (``--budgets``,
shares of the pool):

* ``full``: the ``embed`` stage over the whole pool (timed once per model and size), then the
  ``select`` stage (deita, exact greedy) per budget;
* ``lazy``: the ``select`` stage under ``select.lazy_embed`` per budget, on a fresh copy of the
  scored pool (the model load and every chunk's embedding in its time).

tau: ``--tau``, or ``auto``: the median nearest-neighbour cosine of 2,000 rows of the full
embedding (a random tiny model puts every row near every other; a fixed 0.9 would select one
row and read the whole pool).

Checks (``_common.require``; no ratio is printed when one fails): the lazy run's ids, in order,
equal the full run's; every examined row has the same status and rejecting row, its cosine
within 1e-5 (the two runs batch rows differently, and a batched forward's padding moves the
last bits of a vector; ``max_cosine_difference`` reports it).

Reported per (model, size, budget): rows the greedy examined, rows the lazy run embedded (and
discarded in flight), ``embed_work_over_examined`` (goal <= 1.2), the full embed's seconds, the
lazy select's seconds, and ``lazy_over_goal``: the lazy select's seconds over (examined / pool
x the full embed's seconds + the full select's seconds); goal <= 1.1.

Prints the JSON; writes ``benchmarks/results/lazy_embed.json`` only with ``--write`` (the file
records the machine's load average: a run on a busy machine says so).

Usage: ``python benchmarks/lazy_embed.py [--sizes 20000 100000] [--budgets 0.01 0.05 0.2]
[--models tiny minilm] [--tau auto] [--write]``
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks._common import (  # noqa: E402
    apply_model_env,
    finish,
    machine_info,
    ratio,
    require,
    resolve_model,
    shared_data,
)

NAME = "lazy_embed"


def pool_table(data: Path, n: int, seed: int = 0):
    """``n`` canonical rows from Alpaca (repeated with ``(#k)`` suffixes past its size) with
    an ``evol_score`` of integers 0..9."""
    import pyarrow as pa

    from deita_ray.data.formats import CANONICAL_SCHEMA, canonicalize

    records = json.loads((data / "alpaca" / "alpaca_data.json").read_text())
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        rec = dict(records[k % len(records)])
        if k >= len(records):
            rec["instruction"] = f"{rec['instruction']} (#{k // len(records)})"
        rows.append(
            {
                "id": f"r:{k}",
                "seq": k,
                "messages": canonicalize(rec)["messages"],
                "source": "alpaca",
                "format": "alpaca",
                "extra": "{}",
            }
        )
    table = pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)
    return table.append_column("evol_score", pa.array(rng.integers(0, 10, n).astype(float)))


def model_config(name: str, work: Path):
    from deita_ray.config import ModelConfig

    if name == "tiny":
        from testing.tiny_models import build_tiny_llama

        path = str(build_tiny_llama(work / "tiny"))
        return ModelConfig(path=path, backend="hf", dtype="float32", max_model_len=256)
    path = resolve_model("embedded:minilm")
    return ModelConfig(path=path, backend="hf", dtype="float32", max_model_len=256)


def auto_tau(emb_dir: Path, sample: int = 2000) -> float:
    import pyarrow.dataset as pds

    from deita_ray.selection.calibration import nearest_neighbor_cosines
    from deita_ray.selection.pool import embedding_matrix

    t = pds.dataset(str(emb_dir), format="parquet").to_table(columns=["embedding"])
    nn = nearest_neighbor_cosines(embedding_matrix(t["embedding"])[0], sample=sample, seed=0)
    cos = nn["cosine"][np.isfinite(nn["cosine"])]
    return round(float(np.quantile(cos, 0.5)), 6)


def decisions(out: Path) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(out / "decisions/select/part-00000.parquet")
    return {
        r["id"]: (r["status"], r["rejected_by"], r["cosine"])
        for r in t.to_pylist()
        if r["status"] in ("selected", "similar_to_selected")
    }


def same_decisions(a: dict, b: dict, atol: float = 1e-5) -> tuple[bool, float]:
    """Same examined rows, statuses and rejecting rows; cosines within ``atol`` (the embedder
    batches rows differently in the two runs: a batched forward rounds a row's vector with its
    batch's padding, so the last bits of a cosine may move; with one row per forward pass they
    are equal, tests/stages/test_lazy_embed.py). Returns (equal, largest cosine difference)."""
    if a.keys() != b.keys():
        return False, float("inf")
    worst = 0.0
    for k, (status, by, cos) in a.items():
        s2, by2, cos2 = b[k]
        if (status, by) != (s2, by2):
            return False, float("inf")
        if cos is not None:
            worst = max(worst, abs(cos - cos2))
    return worst <= atol, worst


def run_case(cfg, model: str, n: int, budgets: list[float], tau_arg: str, table, work: Path):
    import pyarrow.parquet as pq

    from deita_ray.stages.embed import run_embed
    from deita_ray.stages.select import run_select

    full = work / f"full-{model}-{n}"
    (full / "score").mkdir(parents=True)
    pq.write_table(table, full / "score" / "part-00000.parquet")
    t = time.perf_counter()
    run_embed(cfg, str(full))
    embed_s = time.perf_counter() - t
    tau = auto_tau(full / "embed") if tau_arg == "auto" else float(tau_arg)
    out = {"rows": n, "tau": tau, "full_embed_s": round(embed_s, 3), "budgets": []}
    checks: dict[str, bool] = {}
    for share in budgets:
        budget = max(1, int(round(share * n)))
        sel = dataclasses.replace(cfg.select, tau=tau, budget=budget, calibrate=False)
        t = time.perf_counter()
        res_full = run_select(dataclasses.replace(cfg, select=sel), str(full))
        full_sel_s = time.perf_counter() - t
        ids_full = pq.read_table(full / "select/part-00000.parquet")["id"].to_pylist()
        dec_full = decisions(full)
        lazy = work / f"lazy-{model}-{n}-{budget}"
        (lazy / "score").mkdir(parents=True)
        shutil.copy(full / "score" / "part-00000.parquet", lazy / "score")
        lazy_cfg = dataclasses.replace(cfg, select=dataclasses.replace(sel, lazy_embed=True))
        t = time.perf_counter()
        res_lazy = run_select(lazy_cfg, str(lazy))
        lazy_s = time.perf_counter() - t
        ids_lazy = pq.read_table(lazy / "select/part-00000.parquet")["id"].to_pylist()
        key = f"{model}_{n}_{budget}"
        checks[f"ids_equal_{key}"] = ids_lazy == ids_full
        same, cos_diff = same_decisions(decisions(lazy), dec_full)
        checks[f"decisions_equal_{key}"] = same
        lz = res_lazy.metrics["lazy_embed"]
        examined = res_full.metrics["pool"]["scanned"]
        goal_s = examined / n * embed_s + full_sel_s
        out["budgets"].append(
            {
                "budget": budget,
                "share": share,
                "selected": len(ids_full),
                "rows_examined": examined,
                "rows_embedded_lazy": lz["rows_embedded"],
                "rows_discarded_in_flight": lz["rows_discarded_in_flight"],
                "rows_embedded_full": n,
                "chunks": lz["chunks"],
                "max_cosine_difference": cos_diff,
                "full_select_s": round(full_sel_s, 3),
                "lazy_select_s": round(lazy_s, 3),
                "lazy_seconds": lz["seconds"],
                "embed_work_over_examined": ratio(
                    lz["rows_embedded"] + lz["rows_discarded_in_flight"], examined, 3
                ),
                "lazy_over_goal": ratio(lazy_s, goal_s, 3),
                "full_embed_plus_select_over_lazy": ratio(embed_s + full_sel_s, lazy_s, 3),
            }
        )
        shutil.rmtree(lazy, ignore_errors=True)
    shutil.rmtree(full, ignore_errors=True)
    return out, checks


def readme_rows(results: list[dict]) -> list[dict[str, str]]:
    """One README row per (model, pool size): per budget, the rows embedded (and dropped in
    flight) against the rows the greedy examined, and the lazy select's seconds against the
    full embed's."""
    rows = []
    for case in results:
        cells = [
            f"{b['share']:.0%}: {b['rows_embedded_lazy']:,} (+{b['rows_discarded_in_flight']:,})"
            f" embedded for {b['rows_examined']:,} examined ({b['embed_work_over_examined']}x), "
            f"{b['lazy_select_s']:.0f} s vs {case['full_embed_s']:.0f} s + "
            f"{b['full_select_s']:.0f} s ({b['lazy_over_goal']}x the goal's time)"
            for b in case["budgets"]
        ]
        rows.append(
            {
                "setting": f"{case['model']}, {case['rows']:,} rows, tau {case['tau']:.3f}, "
                "budgets as shares of the pool",
                "result": "; ".join(cells) + "; ids and decisions equal",
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    ap.add_argument("--models", nargs="+", default=["tiny", "minilm"], choices=["tiny", "minilm"])
    ap.add_argument("--tau", default="auto", help="a cosine, or 'auto' (see the docstring)")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--data", default=None, help="the shared data folder")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/lazy_embed.json")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    args = ap.parse_args()
    apply_model_env()
    import ray

    from deita_ray.config import ActorPoolConfig, PipelineConfig, RayConfig
    from deita_ray.runtime import apply_driver_env, worker_env

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    data = shared_data(args.data)
    work = Path(tempfile.mkdtemp(prefix="bench_lazy_embed_"))
    apply_driver_env()
    ray.init(
        address="local",
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": worker_env(RayConfig(), num_threads=2)},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    results, checks = [], {}
    try:
        for model in args.models:
            cfg = PipelineConfig()
            cfg.embed.model = model_config(model, work)
            cfg.embed.max_length = 256
            cfg.embed.resources = ActorPoolConfig(
                concurrency=args.actors, num_cpus=1, batch_size=args.batch_size
            )
            cfg.output.rows_per_part = 4096
            cfg.select.device = "numpy"
            for n in args.sizes:
                table = pool_table(data, n)
                case, ok = run_case(cfg, model, n, args.budgets, args.tau, table, work)
                results.append({"model": model, **case})
                checks.update(ok)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    payload = {
        "quick": max(args.sizes) < 20000,
        "settings": vars(args),
        "readme": readme_rows(results),
        "results": results,
        "checks": checks,
        "machine": {"load_avg_at_start": load_at_start},
    }
    require(NAME, checks, {"results": results})
    if args.write:
        finish(NAME, payload, args.out)
        return
    text = json.dumps({"benchmark": NAME, **payload, "machine": machine_info()}, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

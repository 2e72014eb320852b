"""Benchmark: streaming ingest (Ray Data, 2 CPUs) vs the naive loop, on a synthetic pool.

Generates a pool of ``--rows`` mixed-format records (Alpaca with/without input, ShareGPT
multi-turn with ids, OpenAI messages with system prompts, Dolly; a few bad rows and planted
duplicate ids) over several files (JSON arrays, JSON lines, JSON lines .gz), then measures in
fresh subprocesses, one after the other on the same machine:

- ``ours``: ``run_ingest`` on a local Ray cluster with 2 CPUs (time excludes ``ray.init``);
- ``naive``: ``json.load`` each file (or ``json.loads`` each line), ``canonicalize`` every
  record in a Python loop, drop duplicate ids with a set, write one Parquet file per input file.

Peak RSS is the measuring process's own (the Ray driver for ``ours``; sampled every 50 ms in a
thread, and ``ru_maxrss``). Both sides run ``--repeat`` times interleaved (default 2; quick: 1)
and the best run of each is compared. Both must count the same rows in, rows out and rejects by
reason in every run, else the run exits 1 and prints no ratio. Writes
``benchmarks/results/ingest.json`` (rows/s, peak RSS, ratios) and prints it.

Usage: ``python benchmarks/ingest.py [--rows N] [--quick] [--files K] [--repeat N] [--workdir DIR]``
"""

from __future__ import annotations

import os
import sys

# Running `python benchmarks/ingest.py` puts benchmarks/ first on sys.path, where
# benchmarks/select.py would shadow the standard library's `select` (used by subprocess); put
# the repository root there instead (for `benchmarks._common`).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from benchmarks._common import finish, ratio, require  # noqa: E402
from testing.synthetic_pool import generate_pool  # noqa: E402

NAME = "ingest"


class PeakRSS:
    """Samples this process's RSS in a thread (psutil), alongside ``ru_maxrss``."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def phase_ours(pool: str, out: str) -> dict:
    import ray

    from deita_ray.config import PipelineConfig
    from deita_ray.runtime import worker_env
    from deita_ray.stages.ingest import run_ingest

    with PeakRSS() as rss:
        t0 = time.time()
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=1 << 30,
            runtime_env={"env_vars": worker_env(num_threads=1)},
            log_to_driver=False,
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        init_s = time.time() - t0
        cfg = PipelineConfig()
        cfg.input.paths = [pool]
        shutil.rmtree(out, ignore_errors=True)  # run_ingest would resume from an earlier run
        t1 = time.time()
        res = run_ingest(cfg, out)
        seconds = time.time() - t1
    ray.shutdown()
    c = res.counts
    return {
        "rows_in": c.rows_in,
        "rows_out": c.rows_out,
        "rejected_by_reason": c.rejected_by_reason,
        "seconds": round(seconds, 2),
        "ray_init_seconds": round(init_s, 2),
        "rows_per_s": round(c.rows_in / seconds, 1),
        "peak_rss_mib": _mib(rss.peak),
        "ru_maxrss_mib": _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }


def phase_naive(pool: str, out: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deita_ray.data.formats import CANONICAL_SCHEMA, Reject, canonicalize
    from deita_ray.data.read import expand_paths, file_stem

    os.makedirs(out, exist_ok=True)
    rows_in = rows_out = 0
    rejected: dict[str, int] = {}
    seen: set[str] = set()
    with PeakRSS() as rss:
        t0 = time.time()
        for rank, path in enumerate(expand_paths(pool)):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                if path.endswith(".json"):
                    records = json.load(f)
                else:
                    records = []
                    for line in f:
                        if line.strip():
                            try:
                                records.append(json.loads(line))
                            except ValueError:
                                records.append(None)
            stem = file_stem(path)
            rows = []
            for i, rec in enumerate(records):
                rows_in += 1
                res = canonicalize(rec) if rec is not None else Reject("invalid_json", "")
                if isinstance(res, Reject):
                    rejected[res.reason] = rejected.get(res.reason, 0) + 1
                    continue
                rid = res["id"] or f"{stem}:{i}"
                if rid in seen:
                    rejected["duplicate_id"] = rejected.get("duplicate_id", 0) + 1
                    continue
                seen.add(rid)
                rows.append(
                    {
                        "id": rid,
                        "seq": (rank << 40) + i,
                        "messages": res["messages"],
                        "source": path,
                        "format": res["format"],
                        "extra": json.dumps(res["extra"], ensure_ascii=False),
                    }
                )
            rows_out += len(rows)
            pq.write_table(
                pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA),
                os.path.join(out, f"part-{rank:03d}.parquet"),
            )
            del records, rows
        seconds = time.time() - t0
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rejected_by_reason": rejected,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows_in / seconds, 1),
        "peak_rss_mib": _mib(rss.peak),
        "ru_maxrss_mib": _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }


def _run_phase(phase: str, pool: str, out: str) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--phase",
        phase,
        "--pool",
        pool,
        "--out",
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="50k rows, one run each")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument(
        "--repeat", type=int, default=None, help="interleaved runs of each side (2; quick: 1)"
    )
    ap.add_argument("--workdir", default=None, help="where the pool and outputs go (temp dir)")
    ap.add_argument("--json-out", default=None, help="also write the JSON to this file")
    ap.add_argument("--phase", choices=["ours", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        fn = phase_ours if args.phase == "ours" else phase_naive
        print(json.dumps(fn(args.pool, args.out)))
        return
    rows = 50_000 if args.quick else args.rows
    repeat = args.repeat or (1 if args.quick else 2)
    load_start = list(os.getloadavg())
    work = args.workdir or tempfile.mkdtemp(prefix="deita_ingest_bench_")
    try:
        pool = os.path.join(work, "pool")
        t0 = time.time()
        paths = generate_pool(pool, rows, args.files)
        gen_s = time.time() - t0
        size = sum(os.path.getsize(p) for p in paths)
        naive_runs, ours_runs = [], []
        for _ in range(repeat):  # interleaved: both see the same machine load over time
            naive_runs.append(_run_phase("naive", pool, os.path.join(work, "out_naive")))
            ours_runs.append(_run_phase("ours", pool, os.path.join(work, "out_ours")))
        keys = ("rows_in", "rows_out", "rejected_by_reason")
        want = {k: naive_runs[0][k] for k in keys}
        require(
            NAME,
            {
                "same_counts_every_run": all(
                    {k: r[k] for k in keys} == want for r in naive_runs + ours_runs
                ),
                "every_row_read": want["rows_in"] >= rows,
            },
            {
                "naive": [{k: r[k] for k in keys} for r in naive_runs],
                "ours": [{k: r[k] for k in keys} for r in ours_runs],
            },
        )
        naive = max(naive_runs, key=lambda r: r["rows_per_s"])
        ours = max(ours_runs, key=lambda r: r["rows_per_s"])
        report = {
            "quick": args.quick,
            "rows": rows,
            "files": len(paths),
            "pool_mib": _mib(size),
            "generate_seconds": round(gen_s, 1),
            "cpus": 2,
            "repeat": repeat,
            "ours": ours,
            "naive": naive,
            "ours_rows_per_s_all_runs": [r["rows_per_s"] for r in ours_runs],
            "naive_rows_per_s_all_runs": [r["rows_per_s"] for r in naive_runs],
            "ratios": {
                "throughput_ours_over_naive": ratio(ours["rows_per_s"], naive["rows_per_s"], 3),
                "peak_rss_ours_over_naive": ratio(ours["peak_rss_mib"], naive["peak_rss_mib"], 3),
            },
            "goal_driver_rss_below_1gib": ours["peak_rss_mib"] < 1024,
            "machine": {"load_avg_at_start": load_start},
        }
        r = report["ratios"]
        report["readme"] = [
            {
                "setting": f"{rows:,} synthetic rows in {len(paths)} files ({_mib(size):,.0f} MiB)",
                "result": (
                    f"driver peak RSS {ours['peak_rss_mib']:,.0f} MiB "
                    f"({r['peak_rss_ours_over_naive']}x a naive one-process loop's); "
                    f"{ours['rows_per_s']:,.0f} rows/s on 2 CPUs, "
                    f"{r['throughput_ours_over_naive']}x the naive loop (best of {repeat} "
                    "interleaved runs); same rows in/out and rejects by reason"
                ),
            }
        ]
        finish(NAME, report, args.json_out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

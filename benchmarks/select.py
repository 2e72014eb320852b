"""Selection benchmark: the exact blocked selector vs the ways it replaces, on the same data.

Prints one JSON object. All single-node numbers come from one process on one planted pool
(n rows, d dims, clusters of near-duplicates with neighbouring scores, so about 3 of 4 scanned
rows are rejected):

* ``ours``: :func:`deita_ray.selection.greedy.select_diverse` (torch on CPU, and numpy).
* ``reference``: DEITA's filter as it runs exactly (batch size 1): per candidate, the accepted
  rows' embeddings are gathered into a NEW array and tensor (``embeddings[filtered_indices]``,
  ``torch.tensor``), both sides are normalised and compared with one ``mm``. It is slow, so it
  runs on a prefix within a time budget (its picks are checked against ours), and its full time
  is extrapolated: the cost of one step at accepted-set size k is measured at several k (probes
  with the real accepted rows), fitted as ``a + b*k``, and summed over the k of every row our
  run scanned. The JSON says which numbers are measured and which extrapolated.
* ``lean``: a per-row loop with one mat-vec per candidate against a preallocated accepted
  matrix (run to the end unless it exceeds its time budget, then extrapolated the same way).
* ``bare_products``: the similarity products ours computes, replayed alone with the same
  shapes on contiguous data: every block-vs-accepted screen and the within-block products of
  the survivors (``SelectionResult.product_shapes``), i.e. the lower bound of the method.
  ``bare_screen_products`` times the block-vs-accepted screens only (a looser bound that
  leaves out the in-block work any blocked method has to do).
* ``distributed``: a pool of ``dist_n x d`` written as Parquet, selected by shard actors on
  this machine; the driver runs in a subprocess whose peak RSS is reported.

Usage: ``python benchmarks/select.py [--quick]``
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib module `select`: when run as a script its folder comes
# first on sys.path and would shadow it (subprocess imports select). Drop that entry.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import json
import resource
import shutil
import subprocess
import tempfile
import time

import numpy as np

from deita_ray.selection.greedy import candidate_order, normalize_rows, select_diverse


def planted_pool(
    n: int, d: int, seed: int = 0, dup: int = 4, noise: float = 0.3, device: str = "numpy"
) -> tuple[np.ndarray, np.ndarray]:
    """n rows in clusters of ``dup`` near-duplicates (pairwise cosine ~1/(1+noise^2) > 0.9)
    whose scores are close, so a cluster's copies meet in the scan order.

    ``device="numpy"`` draws with numpy's generator (the pool of this script's figures). A torch
    device (``"cuda"``, ``"cpu"``) draws the same construction with torch's generator there, in
    row chunks copied into one host float32 array: a 1M x 4096 pool takes seconds on a GPU and
    no full-size temporaries (a different pool of the same kind; used by gpu_check.py).
    """
    if device != "numpy":
        return _planted_pool_torch(n, d, seed, dup, noise, device)
    rng = np.random.default_rng(seed)
    nb = n // dup
    base = rng.standard_normal((nb, d), dtype=np.float32)
    lab = rng.permutation(np.repeat(np.arange(nb), dup))[:n]
    emb = base[lab]
    emb += noise * rng.standard_normal((n, d), dtype=np.float32)
    scores = rng.random(nb)[lab] * 10 + 0.002 * rng.standard_normal(n)
    return emb, scores


def _planted_pool_torch(
    n: int, d: int, seed: int, dup: int, noise: float, device: str, chunk_rows: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    import torch

    if n % dup:
        raise ValueError(f"n={n} is not a multiple of dup={dup}")
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = n // dup
    base = torch.randn((nb, d), generator=gen, device=device)
    lab = torch.arange(nb, device=device).repeat_interleave(dup)
    lab = lab[torch.randperm(len(lab), generator=gen, device=device)][:n]
    emb = np.empty((n, d), dtype=np.float32)
    for s0 in range(0, n, chunk_rows):
        rows = lab[s0 : s0 + chunk_rows]
        part = base[rows] + noise * torch.randn((len(rows), d), generator=gen, device=device)
        torch.from_numpy(emb[s0 : s0 + len(rows)]).copy_(part)  # straight into the host array
    base_score = torch.rand(nb, generator=gen, device=device, dtype=torch.float64)
    jitter = torch.randn(n, generator=gen, device=device, dtype=torch.float64)
    scores = (base_score[lab] * 10 + 0.002 * jitter).cpu().numpy()
    return emb, scores


def replay_products(xs, shapes: list[tuple[int, int]], sync=None) -> float:
    """Seconds to compute the similarity products of ``shapes`` alone (the bare bound).

    Each recorded ``(rows, cols)`` product is replayed as ``xs[:rows] @ xs[:cols].T`` and its
    row maximum, on contiguous data (no gathers, no normalisation, no bookkeeping); ``xs`` is
    a torch matrix of at least ``max(rows, cols)`` unit rows on the device to time. ``sync``
    waits for the device (GPU kernels run asynchronously).
    """
    t = time.perf_counter()
    for rows, cols in shapes:
        (xs[:rows] @ xs[:cols].T).amax(dim=1)
    if sync is not None:
        sync()
    return time.perf_counter() - t


def k_before(result, order: np.ndarray, scanned: int) -> np.ndarray:
    """Accepted-set size seen by each of the first ``scanned`` rows of the scan order."""
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    acc = np.zeros(scanned, np.int64)
    acc[rank[result.indices]] = 1
    return np.concatenate([[0], np.cumsum(acc)[:-1]])


def reference_step(torch, sorted_emb: np.ndarray, filtered: list[int], i: int, tau: float):
    """One candidate of DEITA's filter with batch size 1 (src/deita/selection/filter/base.py)."""
    cur = torch.tensor(sorted_emb[i : i + 1], dtype=torch.float32)
    existing = sorted_emb[filtered]  # a new array, gathered every step

    def dist(m1, m2):
        m1 = m1 / m1.norm(dim=1)[:, None]  # normalize_emb
        m2 = m2 / m2.norm(dim=1)[:, None]
        m1 = m1 / m1.norm(dim=1)[:, None]  # cosine metric normalises again
        m2 = m2 / m2.norm(dim=1)[:, None]
        return torch.mm(m1, m2.t())

    chunk = torch.tensor(existing, dtype=torch.float32)  # a new tensor, every step
    d_exist = torch.zeros((1, len(filtered)), dtype=torch.float32)
    d_exist[:, :] = dist(cur, chunk)
    d_cur = dist(cur, cur).tril(-1)
    return not bool(torch.any(d_exist > tau, dim=1) | torch.any(d_cur > tau, dim=1))


def lean_step(torch, acc, k: int, x, tau: float) -> bool:
    return k == 0 or float(torch.mv(acc[:k], x).max()) <= tau


def fit_cost(probe_k: list[int], probe_s: list[float]) -> tuple[float, float]:
    """Least-squares a + b*k of per-step seconds."""
    a_mat = np.stack([np.ones(len(probe_k)), np.asarray(probe_k, np.float64)], 1)
    a, b = np.linalg.lstsq(a_mat, np.asarray(probe_s), rcond=None)[0]
    return float(max(a, 0.0)), float(max(b, 0.0))


def probe(step, ks: list[int], reps: int) -> list[float]:
    """Fastest of ``reps`` timings of ``step(k)`` at each k."""
    out = []
    for k in ks:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            step(k)
            ts.append(time.perf_counter() - t)
        out.append(float(np.min(ts)))  # best case: fair to the slow ways on a busy machine
    return out


def single_node(
    n: int,
    d: int,
    m: int,
    tau: float,
    block: int,
    ref_budget_s: float,
    lean_budget_s: float,
    reps: int = 5,
) -> dict:
    import torch

    emb, scores = planted_pool(n, d)
    res: dict = {
        "n": n,
        "d": d,
        "m": m,
        "tau": tau,
        "block_size": block,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    # Ours (torch CPU and numpy), best of 2 after a warm-up call.
    select_diverse(emb[:2000], scores[:2000], tau, 50, block_size=block, device="cpu")
    times = {}
    for dev in ("cpu", "numpy"):
        best = np.inf
        for _ in range(2):
            t = time.perf_counter()
            r = select_diverse(emb, scores, tau, m, block_size=block, device=dev)
            best = min(best, time.perf_counter() - t)
            if dev == "cpu":
                ours = r
        times[dev] = best
    st = ours.stats
    scanned = st["scanned"]
    res["pool_stats"] = {
        k: st[k]
        for k in ("scanned", "selected", "rejected_for_similarity", "not_reached", "band_checks")
    }
    res["rejected_share_of_scanned"] = round(st["rejected_for_similarity"] / scanned, 3)
    res["ours_torch_cpu_s"] = round(times["cpu"], 3)
    res["ours_numpy_s"] = round(times["numpy"], 3)

    order = candidate_order(scores, np.arange(n), np.ones(n, bool))
    ks = k_before(ours, order, scanned)
    sorted_emb = emb[order[:scanned]]  # DEITA sorts its frame first (not timed for anyone)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    rank_acc = rank[ours.indices]  # positions of our picks in the scan order (increasing)
    a_mat = torch.from_numpy(normalize_rows(emb[ours.indices]))
    probe_ks = sorted({1, *(int(x) for x in np.linspace(1, m, 6))})

    # Reference: a measured prefix (checked against ours), then probes for the fit.
    filtered: list[int] = [0]
    t0 = time.perf_counter()
    i = 1
    while i < scanned and len(filtered) < m and time.perf_counter() - t0 < ref_budget_s:
        if reference_step(torch, sorted_emb, filtered, i, tau):
            filtered.append(i)
        i += 1
    ref_prefix_s = time.perf_counter() - t0
    prefix_ok = filtered == rank_acc[: len(filtered)].tolist()
    ref_probe = probe(
        lambda k: reference_step(torch, sorted_emb, rank_acc[:k].tolist(), scanned - 1, tau),
        probe_ks,
        reps=5,
    )
    a, b = fit_cost(probe_ks, ref_probe)
    ref_model_prefix = float(np.sum(a + b * ks[1:i]))
    ref_total = float(np.sum(a + b * ks))
    res["reference"] = {
        "measured_prefix_rows": i,
        "measured_prefix_s": round(ref_prefix_s, 3),
        "prefix_picks_equal_ours": bool(prefix_ok),
        "probe_k": probe_ks,
        "probe_s_per_row": [round(x, 6) for x in ref_probe],
        "model_s_per_row": {"a": a, "b_per_accepted_row": b},
        "model_prefix_s": round(ref_model_prefix, 3),
        "extrapolated_total_s": round(ref_total, 1),
        "note": "total = sum over our scanned rows of (a + b*k_row), fitted on probes",
    }

    # Lean per-row loop: run to the end if it fits its budget, else extrapolate.
    u = torch.from_numpy(normalize_rows(sorted_emb))
    acc = torch.empty((m, d), dtype=torch.float32)
    lean_picks: list[int] = []
    t0 = time.perf_counter()
    j = 0
    while j < scanned and len(lean_picks) < m and time.perf_counter() - t0 < lean_budget_s:
        x = u[j]
        if lean_step(torch, acc, len(lean_picks), x, tau):
            acc[len(lean_picks)] = x
            lean_picks.append(j)
        j += 1
    lean_s = time.perf_counter() - t0
    finished = len(lean_picks) >= m or j >= scanned
    if finished:
        lean_total, lean_how = lean_s, "measured (full run)"
    else:
        lean_probe = probe(lambda kk: lean_step(torch, a_mat, kk, u[-1], tau), probe_ks, 20)
        la, lb = fit_cost(probe_ks, lean_probe)
        lean_total, lean_how = float(np.sum(la + lb * ks)), "extrapolated (a + b*k fit)"
    res["lean"] = {
        "rows_run": j,
        "run_s": round(lean_s, 3),
        "total_s": round(lean_total, 3),
        "how": lean_how,
        "picks_equal_ours_on_run_rows": lean_picks == rank_acc[: len(lean_picks)].tolist(),
    }

    # Bare products: the similarity products ours computes, replayed with the same shapes on
    # contiguous data (no gathers, no normalisation, no bookkeeping): every block x accepted
    # screen, and the within-block products of the survivors (cross and Gram). Timed
    # interleaved with ours (min of `reps` each) so that both see the same machine load.
    xs = torch.from_numpy(normalize_rows(sorted_emb)).clone()  # torch-allocated (aligned)
    a_bare = a_mat.clone()
    shapes = list(ours.product_shapes)

    def bare_screen_run() -> float:
        t = time.perf_counter()
        for s0 in range(0, scanned, block):
            kb = int(ks[s0])
            if kb:
                (xs[s0 : s0 + block] @ a_bare[:kb].T).amax(dim=1)
        return time.perf_counter() - t

    def bare_all_run() -> float:
        return replay_products(xs, shapes)

    bare, bare_screen = np.inf, np.inf
    for _ in range(reps):
        bare = min(bare, bare_all_run())
        bare_screen = min(bare_screen, bare_screen_run())
        t = time.perf_counter()
        select_diverse(emb, scores, tau, m, block_size=block, device="cpu")
        times["cpu"] = min(times["cpu"], time.perf_counter() - t)
    res["ours_torch_cpu_s"] = round(times["cpu"], 3)
    res["bare_products_s"] = round(bare, 3)
    res["bare_screen_products_s"] = round(bare_screen, 3)
    res["products"] = {
        "count": len(shapes),
        "gflop": round(sum(2.0 * r * c * d for r, c in shapes) / 1e9, 2),
        "screen_gflop": round(
            sum(2.0 * min(block, scanned - s0) * int(ks[s0]) * d for s0 in range(0, scanned, block))
            / 1e9,
            2,
        ),
    }
    res["timing_note"] = (
        f"ours and bare products: fastest of {reps + 2} / {reps} runs, "
        "interleaved; the machine is shared (see load_avg)"
    )
    res["ratios"] = {
        "reference_over_ours": round(ref_total / times["cpu"], 1),
        "lean_over_ours": round(lean_total / times["cpu"], 1),
        "ours_over_bare_products": round(times["cpu"] / bare, 2),
        "ours_over_bare_screen_products_only": round(times["cpu"] / bare_screen, 2),
    }
    res["goals"] = {
        "reference_over_ours": ">= 100",
        "lean_over_ours": ">= 10",
        "ours_over_bare_products": "<= 2",
    }
    return res


def write_pool(folder: str, n: int, d: int, rows_per_file: int, seed: int = 1) -> float:
    """Write a planted pool as the embed stage does (id, seq, evol_score, embedding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    nb = n // 4
    base = rng.standard_normal((nb, d), dtype=np.float32)
    base_score = rng.random(nb) * 10
    lab = rng.permutation(np.repeat(np.arange(nb), 4))[:n]
    for f, s0 in enumerate(range(0, n, rows_per_file)):
        sl = lab[s0 : s0 + rows_per_file]
        emb = base[sl] + 0.3 * rng.standard_normal((len(sl), d), dtype=np.float32)
        seq = np.arange(s0, s0 + len(sl), dtype=np.int64)
        table = pa.table(
            {
                "id": pa.array([f"r{x}" for x in seq]),
                "seq": pa.array(seq),
                "evol_score": pa.array(base_score[sl] + 0.002 * rng.standard_normal(len(sl))),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d),
            }
        )
        pq.write_table(
            table,
            os.path.join(folder, f"part-{f:05d}.parquet"),
            compression="none",
            row_group_size=8192,
        )
    return time.perf_counter() - t0


def distributed_driver(folder: str, m: int, tau: float, shards: int, block: int) -> dict:
    """Runs in its own process: the driver of the distributed selection (RSS measured)."""
    import threading

    import psutil
    import ray

    from deita_ray.selection.distributed import select_distributed

    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    ray.init(
        address="local",  # a fresh cluster, even if others run one on this machine
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        object_store_memory=1024**3,
        log_to_driver=False,
    )
    t_init = time.perf_counter() - t0
    maxrss_after_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    rss_after_init = proc.memory_info().rss / 1024**3
    try:
        t1 = time.perf_counter()
        r = select_distributed(
            folder,
            tau,
            m,
            shards,
            block_size=block,
            device="cpu",
            shard_num_cpus=0.5,
            driver_device="cpu",
        )
        t_sel = time.perf_counter() - t1
    finally:
        ray.shutdown()
        stop.set()
    th.join()
    st = r.stats
    return {
        "shards": shards,
        "m": m,
        "tau": tau,
        "block_size": block,
        "selected": st["selected"],
        "scanned": st["scanned"],
        "rounds": st["rounds"],
        "shard_screened": st["shard_screened"],
        "ray_init_s": round(t_init, 2),
        "shard_load_s": st["load_s"],
        "select_after_load_s": st["select_s"],
        "total_s": round(t_sel, 2),
        "driver_peak_rss_gib": round(peak[0] / 1024**3, 3),
        "driver_rss_after_ray_init_gib": round(rss_after_init, 3),
        "driver_ru_maxrss_after_ray_init_gib": round(maxrss_after_init, 3),
        "driver_ru_maxrss_gib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3
        ),
        "ids_head": r.ids[:3],
    }


def distributed(n: int, d: int, m: int) -> dict:
    """Write an n x d pool as Parquet, select from it with 4 shards; driver in a subprocess."""
    tmp = tempfile.mkdtemp(prefix="deita_select_bench_")
    try:
        folder = os.path.join(tmp, "embed")
        env = {
            **os.environ,
            "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        }
        # The writer and the driver run in their own processes and this one stays small:
        # Linux carries a parent's peak RSS into a spawned child's ru_maxrss.
        t0 = time.perf_counter()
        wcmd = [sys.executable, os.path.abspath(__file__), "--_write", folder, str(n), str(d)]
        subprocess.run(wcmd, check=True, env=env)
        write_s = time.perf_counter() - t0
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--_driver",
            folder,
            str(m),
            "0.9",
            "4",
            "1024",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"distributed driver failed:\n{proc.stderr[-4000:]}")
        dist = json.loads(proc.stdout.strip().splitlines()[-1])
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        dist.update(
            {
                "n": n,
                "d": d,
                "parquet_write_s": round(write_s, 1),
                "parquet_gib": round(size / 1024**3, 2),
                "goal": "driver peak RSS <= 2 GiB",
            }
        )
        return dist
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a minute)")
    ap.add_argument(
        "--part",
        choices=("all", "single", "distributed"),
        default="all",
        help="run only the single-node or only the distributed measurements",
    )
    ap.add_argument("--_driver", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--_write", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write:
        write_pool(args._write[0], int(args._write[1]), int(args._write[2]), 50_000)
        return
    if args._driver:
        folder, m, tau, shards, block = args._driver
        print(json.dumps(distributed_driver(folder, int(m), float(tau), int(shards), int(block))))
        return
    if args.quick:
        cfg = dict(n=20_000, d=256, m=1_000, ref_s=5, lean_s=20, dist_n=100_000, dist_m=2_000)
    else:
        cfg = dict(n=100_000, d=1024, m=5_000, ref_s=60, lean_s=60, dist_n=1_000_000, dist_m=10_000)
    out = {"mode": "quick" if args.quick else "full", "load_avg_at_start": os.getloadavg()}
    # Distributed first, while this process is still small (see distributed()).
    if args.part in ("all", "distributed"):
        out["distributed"] = distributed(cfg["dist_n"], cfg["d"], cfg["dist_m"])
    if args.part in ("all", "single"):
        out["single_node"] = single_node(
            cfg["n"], cfg["d"], cfg["m"], 0.9, 1024, cfg["ref_s"], cfg["lean_s"]
        )
    out["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

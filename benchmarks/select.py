"""Selection benchmark: the exact blocked selector vs the ways it replaces, on the same data.

Writes ``benchmarks/results/select.json`` and prints it. Every ratio's sides are timed
interleaved (round after round, so all see the same load) and reported as the minimum of the
rounds. The run stops with exit status 1 and prints no ratio when an output differs from its
reference (``_common.require``). Single-node numbers come from one process on one planted pool
(n rows, d dims, clusters of near-duplicates with neighbouring scores, so about 3 of 4 scanned
rows are rejected):

* ``ours``: :func:`deita_ray.selection.greedy.select_diverse` on numpy and on torch (CPU), with
  and without the explanations of rejected rows (``rejected_by``); all must pick the same ids
  and explain every row the same way.
* ``reference``: DEITA's filter as it runs exactly (batch size 1): per candidate, the accepted
  rows' embeddings are gathered into a NEW array and tensor (``embeddings[filtered_indices]``,
  ``torch.tensor``), both sides are normalised and compared with one ``mm``. It runs on a
  prefix of the scan order within a time budget (its picks must equal ours), and its full time
  is EXTRAPOLATED: the cost of one step at accepted-set size k is measured at several k (probes
  with the real accepted rows, interleaved with our runs), fitted as ``a + b*k``, and summed
  over the k of every row our run scanned. The JSON and the README row name the measured
  prefix.
* ``lean``: a per-row loop with one mat-vec per candidate against a preallocated accepted
  matrix, run in full each round when it fits its time budget (else extrapolated the same way,
  and said so).
* ``bare_products``: the similarity products ours computes (recorded with the ``on_product``
  hook, :class:`ProductRecorder`), replayed alone with the same shapes on contiguous data, i.e.
  the lower bound of the method; ``bare_screen_products``: the block-vs-accepted screens only.
* ``tau_curve`` / ``nearest_neighbor_cosines`` (deita_ray.selection.calibration) on the pool.
* ``distributed``: a pool of ``dist_n x d`` written as Parquet, selected by shard actors on
  this machine (the driver in a subprocess whose peak RSS is reported), then by the
  single-node method on the same rows (embeddings memory-mapped): the ids, the status of every
  row and what rejected it must be equal, else the benchmark fails.

Usage: ``python benchmarks/select.py [--quick] [--part all|single|distributed] [--repeat N]``
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, benchmarks/ is sys.path[0]: this file would shadow the stdlib `select`
# (subprocess imports it). Drop it and put the repository root there instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks._common import Timed, finish, interleaved, ratio, require  # noqa: E402
from deita_ray.selection.calibration import (  # noqa: E402
    nearest_neighbor_cosines,
    tau_curve,
    tau_grid,
)
from deita_ray.selection.greedy import (  # noqa: E402
    candidate_order,
    normalize_rows,
    resolve_device,
    select_diverse,
)

NAME = "select"


class ProductRecorder:
    """The ``on_product`` hook of the selector: records ``(rows, cols)`` of every similarity
    product a run computes, so that :func:`replay_products` can time the bare work."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, rows: int, cols: int) -> None:
        self.shapes.append((int(rows), int(cols)))


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


def replay_products_numpy(xs: np.ndarray, shapes: list[tuple[int, int]]) -> float:
    """:func:`replay_products` with numpy (BLAS) on a host matrix."""
    t = time.perf_counter()
    for rows, cols in shapes:
        (xs[:rows] @ xs[:cols].T).max(axis=1)
    return time.perf_counter() - t


def probe_once(step, ks: list[int], reps: int = 3) -> list[float]:
    """Fastest of ``reps`` timings of ``step(k)`` per k, in one round of :func:`interleaved`
    (the rounds repeat it; the minimum over rounds is used)."""
    out = []
    for k in ks:
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            step(k)
            best = min(best, time.perf_counter() - t)
        out.append(best)
    return out


def _digest(r) -> tuple:
    return (r.indices, r.row_status, r.rejected_by, r.rejected_sim)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def single_node(
    n: int, d: int, m: int, tau: float, block: int, ref_s: float, lean_s: float, repeat: int
) -> tuple[dict, dict, dict]:
    """The single-node measurements.

    Returns:
        (results, checks, facts): the timings and ratios, the equality checks, and the
        numbers behind the checks.
    """
    import torch

    emb, scores = planted_pool(n, d)
    auto = resolve_device("auto")
    lib = "numpy" if auto == "numpy" else "torch_cpu"
    for dev in ("numpy", "cpu"):  # warm-up (BLAS/torch thread pools, first-call costs)
        select_diverse(emb[:2000], scores[:2000], tau, 50, block_size=block, device=dev)
    rec = ProductRecorder()
    ours = select_diverse(emb, scores, tau, m, block_size=block, device="numpy", on_product=rec)
    rec_plain = ProductRecorder()
    select_diverse(
        emb, scores, tau, m, block_size=block, device="numpy", explain=False, on_product=rec_plain
    )
    st = ours.stats
    scanned = st["scanned"]
    order = candidate_order(scores, np.arange(n), np.ones(n, bool))
    ks = k_before(ours, order, scanned)
    sorted_emb = emb[order[:scanned]]  # DEITA sorts its frame first (not timed for anyone)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    rank_acc = rank[ours.indices]  # positions of our picks in the scan order (increasing)
    a_mat = torch.from_numpy(normalize_rows(emb[ours.indices]))
    probe_ks = sorted({1, *(int(x) for x in np.linspace(1, m, 6))})

    # Reference: a measured prefix (its picks must equal ours), probes later in the rounds.
    filtered: list[int] = [0]
    t0 = time.perf_counter()
    i = 1
    while i < scanned and len(filtered) < m and time.perf_counter() - t0 < ref_s:
        if reference_step(torch, sorted_emb, filtered, i, tau):
            filtered.append(i)
        i += 1
    ref_prefix_s = time.perf_counter() - t0
    ref_prefix_ok = filtered == rank_acc[: len(filtered)].tolist()

    # Lean per-row loop: in full each round if one run fits its budget, else probes + fit.
    u = torch.from_numpy(normalize_rows(sorted_emb))

    def lean_run(budget_s: float = float("inf")) -> tuple[list[int], int]:
        acc = torch.empty((m, d), dtype=torch.float32)
        picks: list[int] = []
        j, t = 0, time.perf_counter()
        while j < scanned and len(picks) < m and time.perf_counter() - t < budget_s:
            x = u[j]
            if lean_step(torch, acc, len(picks), x, tau):
                acc[len(picks)] = x
                picks.append(j)
            j += 1
        return picks, j

    t0 = time.perf_counter()
    lean_picks, lean_rows = lean_run(lean_s)
    lean_first_s = time.perf_counter() - t0
    lean_full = len(lean_picks) >= m or lean_rows >= scanned
    lean_ok = lean_picks == rank_acc[: len(lean_picks)].tolist()

    # Bare products: the recorded shapes, replayed on contiguous unit rows.
    shapes = rec.shapes
    need = max(scanned, *(max(r, c) for r, c in shapes))
    xs = torch.from_numpy(normalize_rows(emb[order[:need]])).clone()  # torch-allocated
    xs_np = xs.numpy()
    a_bare = a_mat.clone()

    def bare_screen() -> Timed:
        t = time.perf_counter()
        for s0 in range(0, scanned, block):
            kb = int(ks[s0])
            if kb:
                (xs[s0 : s0 + block] @ a_bare[:kb].T).amax(dim=1)
        return Timed(time.perf_counter() - t)

    def run(dev: str, explain: bool):
        return lambda: _digest(
            select_diverse(emb, scores, tau, m, block_size=block, device=dev, explain=explain)
        )

    sides = {
        "ours_numpy": run("numpy", True),
        "ours_numpy_no_explain": run("numpy", False),
        "ours_torch_cpu": run("cpu", True),
        "ours_torch_cpu_no_explain": run("cpu", False),
        "bare_products_numpy": lambda: Timed(replay_products_numpy(xs_np, shapes)),
        "bare_products_torch_cpu": lambda: Timed(replay_products(xs, shapes)),
        "bare_screen_products_torch_cpu": bare_screen,
        "reference_probes": lambda: probe_once(
            lambda k: reference_step(torch, sorted_emb, rank_acc[:k].tolist(), scanned - 1, tau),
            probe_ks,
        ),
    }
    if lean_full:
        sides["lean_full"] = lambda: Timed(*_timed(lean_run))
    else:
        sides["lean_probes"] = lambda: probe_once(
            lambda k: lean_step(torch, a_mat, k, u[-1], tau), probe_ks
        )
    rounds = interleaved(sides, repeat)

    # Checks: every run of ours (both devices, with and without explanations) picks the same
    # rows and, where asked, explains every row the same way; the reference and the lean loop
    # pick what ours picked on the rows they ran.
    ref_digest = _digest(ours)
    ours_sides = [k for k in rounds if k.startswith("ours_")]
    ids_equal = all(
        _same(o[0], ref_digest[0]) and _same(o[1], ref_digest[1])
        for k in ours_sides
        for o in rounds[k]["outputs"]
    )
    explained_equal = all(
        _same(o[2], ref_digest[2]) and _same(o[3], ref_digest[3])
        for k in ours_sides
        if not k.endswith("no_explain")
        for o in rounds[k]["outputs"]
    )
    lean_run_picks = rounds["lean_full"]["outputs"] if lean_full else []
    lean_ok = lean_ok and all(p[0] == rank_acc[: len(p[0])].tolist() for p in lean_run_picks)
    checks = {
        "ours_ids_equal_numpy_torch_explain_or_not": ids_equal,
        "ours_rejected_by_equal_numpy_torch": explained_equal,
        "reference_prefix_picks_equal_ours": ref_prefix_ok and len(filtered) > 1,
        "lean_picks_equal_ours": lean_ok and len(lean_picks) > 1,
    }
    facts = {
        "selected": st["selected"],
        "scanned": scanned,
        "reference_prefix_rows": i,
        "reference_prefix_picks": len(filtered),
        "lean_rows_run": lean_rows,
        "lean_picks": len(lean_picks),
    }
    results = _single_results(
        n, d, m, tau, block, repeat, auto, lib, st, ks, probe_ks, rounds, rec, rec_plain,
        i, ref_prefix_s, lean_full, lean_rows, lean_first_s, emb, scores,
    )  # fmt: skip
    return results, checks, facts


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _single_results(
    n,
    d,
    m,
    tau,
    block,
    repeat,
    auto,
    lib,
    st,
    ks,
    probe_ks,
    rounds,
    rec,
    rec_plain,
    ref_rows,
    ref_prefix_s,
    lean_full,
    lean_rows,
    lean_first_s,
    emb,
    scores,
) -> dict:
    """Timings and ratios of :func:`single_node`, computed once its checks passed."""
    mins = {k: v["min_s"] for k, v in rounds.items()}
    ours_key = "ours_numpy" if auto == "numpy" else "ours_torch_cpu"
    ours_s = mins[ours_key]
    ref_probe = np.min([np.asarray(o) for o in rounds["reference_probes"]["outputs"]], 0)
    a, b = fit_cost(probe_ks, ref_probe.tolist())
    ref_total = float(np.sum(a + b * ks))
    ref_model_prefix = float(np.sum(a + b * ks[1:ref_rows]))
    if lean_full:
        lean_total, lean_how = mins["lean_full"], "measured in full"
    else:
        lp = np.min([np.asarray(o) for o in rounds["lean_probes"]["outputs"]], 0)
        la, lb = fit_cost(probe_ks, lp.tolist())
        lean_total = float(np.sum(la + lb * ks))
        lean_how = f"extrapolated from a measured prefix of {lean_rows} rows"
    scanned = st["scanned"]
    gflop = sum(2.0 * r * c * d for r, c in rec.shapes) / 1e9
    return {
        "n": n,
        "d": d,
        "m": m,
        "tau": tau,
        "block_size": block,
        "rounds": repeat,
        "auto_device": auto,
        "pool_stats": {
            k: st[k]
            for k in (
                "scanned",
                "selected",
                "rejected_for_similarity",
                "not_reached",
                "band_checks",
            )
        },
        "rejected_share_of_scanned": round(st["rejected_for_similarity"] / scanned, 3),
        "seconds_min": {k: round(v, 4) for k, v in mins.items() if not k.endswith("_probes")},
        "seconds_all_rounds": {
            k: v["runs_s"] for k, v in rounds.items() if not k.endswith("_probes")
        },
        "products": {
            "count": len(rec.shapes),
            "gflop": round(gflop, 2),
            "count_without_explanations": len(rec_plain.shapes),
            "gflop_without_explanations": round(
                sum(2.0 * r * c * d for r, c in rec_plain.shapes) / 1e9, 2
            ),
        },
        "reference": {
            "measured_prefix_rows": ref_rows,
            "measured_prefix_s": round(ref_prefix_s, 3),
            "model_prefix_s": round(ref_model_prefix, 3),
            "probe_k": probe_ks,
            "probe_s_per_row_min": [round(float(x), 6) for x in ref_probe],
            "model_s_per_row": {"a": a, "b_per_accepted_row": b},
            "extrapolated_total_s": round(ref_total, 1),
            "note": (
                "extrapolated: total = sum over our scanned rows of (a + b*k_row), fitted on "
                "probes; model_prefix_s vs measured_prefix_s checks the fit on the prefix"
            ),
        },
        "lean": {
            "total_s": round(lean_total, 3),
            "how": lean_how,
            "rows_run_in_budget": lean_rows,
            "first_run_s": round(lean_first_s, 3),
        },
        "ratios": {
            "reference_over_ours_extrapolated": ratio(ref_total, ours_s, 1),
            f"lean_over_ours_{'measured' if lean_full else 'extrapolated'}": ratio(
                lean_total, ours_s, 1
            ),
            "ours_over_bare_products": ratio(ours_s, mins[f"bare_products_{lib}"]),
            "ours_over_bare_screen_products_only": ratio(
                mins["ours_torch_cpu"], mins["bare_screen_products_torch_cpu"]
            ),
            "numpy_over_torch_cpu": ratio(mins["ours_numpy"], mins["ours_torch_cpu"], 3),
            "explain_over_no_explain_numpy": ratio(
                mins["ours_numpy"], mins["ours_numpy_no_explain"], 3
            ),
            "explain_over_no_explain_torch_cpu": ratio(
                mins["ours_torch_cpu"], mins["ours_torch_cpu_no_explain"], 3
            ),
        },
        "calibration": calibration(emb, scores, tau, m, block, auto),
    }


def calibration(emb, scores, tau: float, m: int, block: int, device: str) -> dict:
    """tau_curve over the default grid and nearest-neighbour cosines of a sample, timed."""
    taus = tau_grid(tau)
    t = time.perf_counter()
    curve = tau_curve(scores, emb, taus, m, block_size=block, device=device)
    curve_s = time.perf_counter() - t
    t = time.perf_counter()
    nn = nearest_neighbor_cosines(emb, sample=2000, seed=0)
    nn_s = time.perf_counter() - t
    q = np.quantile(nn["cosine"], [0.1, 0.5, 0.9, 0.99])
    return {
        "tau_curve": {k: curve[k] for k in ("tau", "selected", "scanned", "seconds")},
        "tau_curve_s": round(curve_s, 2),
        "nearest_neighbor": {
            "method": nn["method"],
            "quantiles_p10_p50_p90_p99": [round(float(x), 4) for x in q],
            "seconds": round(nn_s, 2),
        },
    }


def write_pool(folder: str, n: int, d: int, rows_per_file: int, seed: int = 1) -> float:
    """Write a planted pool as the embed stage does (id, seq, evol_score, embedding), and the
    same embeddings as ``<folder>/../embeddings.npy`` (the single-node check maps it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    mm = np.lib.format.open_memmap(
        os.path.join(os.path.dirname(folder), "embeddings.npy"), "w+", np.float32, (n, d)
    )
    rng = np.random.default_rng(seed)
    nb = n // 4
    base = rng.standard_normal((nb, d), dtype=np.float32)
    base_score = rng.random(nb) * 10
    lab = rng.permutation(np.repeat(np.arange(nb), 4))[:n]
    for f, s0 in enumerate(range(0, n, rows_per_file)):
        sl = lab[s0 : s0 + rows_per_file]
        emb = base[sl] + 0.3 * rng.standard_normal((len(sl), d), dtype=np.float32)
        mm[s0 : s0 + len(sl)] = emb
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
    mm.flush()
    del mm
    return time.perf_counter() - t0


def _peak_rss_sampler():
    """A thread sampling this process's RSS every 50 ms; returns (peak list, stop)."""
    import threading

    import psutil

    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    return peak, stop


def distributed_driver(folder: str, m: int, tau: float, shards: int, block: int) -> dict:
    """Runs in its own process: the driver of the distributed selection (RSS measured). Saves
    the selection and what happened to every row to ``<folder>/../distributed.npz``."""
    import ray

    from deita_ray.selection.distributed import select_distributed

    peak, stop = _peak_rss_sampler()
    t0 = time.perf_counter()
    ray.init(
        address="local",  # a fresh cluster, even if others run one on this machine
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        object_store_memory=1024**3,
        log_to_driver=False,
    )
    t_init = time.perf_counter() - t0
    rss_after_init = peak[0] / 1024**3
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
    np.savez(
        os.path.join(os.path.dirname(folder), "distributed.npz"),
        indices=r.indices,
        ids=np.asarray(r.ids),
        row_status=r.row_status,
        rejected_by=r.rejected_by,
        rejected_sim=r.rejected_sim,
    )
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
        "driver_ru_maxrss_gib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3
        ),
    }


def single_node_check(folder: str, m: int, tau: float, block: int) -> dict:
    """Runs in its own process: the single-node method on the same pool (embeddings mapped from
    ``embeddings.npy``, ids/seq/scores from the Parquet), compared with the distributed run."""
    import pyarrow.parquet as pq

    from deita_ray.data.sink import parquet_files

    work = os.path.dirname(folder)
    files = parquet_files(folder, recursive=True)
    cols = [pq.read_table(f, columns=["id", "seq", "evol_score"]) for f in files]
    ids = [x for t in cols for x in t["id"].to_pylist()]
    seq = np.concatenate([t["seq"].to_numpy() for t in cols])
    scores = np.concatenate([t["evol_score"].to_numpy() for t in cols])
    emb = np.load(os.path.join(work, "embeddings.npy"), mmap_mode="r")
    t = time.perf_counter()
    r = select_diverse(emb, scores, tau, m, seq=seq, ids=ids, block_size=block, device="auto")
    seconds = time.perf_counter() - t
    dist = np.load(os.path.join(work, "distributed.npz"))
    return {
        "single_node_s": round(seconds, 2),
        "selected": len(r),
        "ids_equal": bool(r.ids == dist["ids"].tolist()),
        "indices_equal": bool(np.array_equal(r.indices, dist["indices"])),
        "row_status_equal": bool(np.array_equal(r.row_status, dist["row_status"])),
        "rejected_by_equal": bool(np.array_equal(r.rejected_by, dist["rejected_by"])),
        "rejected_sim_equal": bool(
            np.array_equal(r.rejected_sim, dist["rejected_sim"], equal_nan=True)
        ),
        "rejected_rows": int(np.count_nonzero(r.rejected_by >= 0)),
    }


def _self_cmd(*args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *args]


def _json_of(cmd: list[str], env: dict, what: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def distributed(n: int, d: int, m: int, tau: float, shards: int, block: int) -> tuple[dict, dict]:
    """Write an n x d pool as Parquet, select from it with shard actors (driver in a
    subprocess), then with the single-node method (another subprocess).

    Returns:
        (results, checks).
    """
    tmp = tempfile.mkdtemp(prefix="deita_select_bench_")
    try:
        folder = os.path.join(tmp, "embed")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        # A busy machine can take more than Ray's default minute to start a raylet.
        env.setdefault("RAY_raylet_start_wait_time_s", "300")
        # The writer, the driver and the check run in their own processes and this one stays
        # small: Linux carries a parent's peak RSS into a spawned child's ru_maxrss.
        t0 = time.perf_counter()
        subprocess.run(_self_cmd("--_write", folder, str(n), str(d)), check=True, env=env)
        write_s = time.perf_counter() - t0
        args = (folder, str(m), str(tau), str(block))
        dist = _json_of(_self_cmd("--_driver", *args, str(shards)), env, "distributed driver")
        check = _json_of(_self_cmd("--_single", *args), env, "single-node check")
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        dist.update(
            {
                "n": n,
                "d": d,
                "parquet_write_s": round(write_s, 1),
                "parquet_gib": round(size / 1024**3, 2),
                "single_node_check": check,
                "goal": "driver peak RSS <= 2 GiB",
            }
        )
        checks = {
            f"distributed_{k}_single_node": bool(check[k])
            for k in (
                "ids_equal",
                "indices_equal",
                "row_status_equal",
                "rejected_by_equal",
                "rejected_sim_equal",
            )
        }
        checks["distributed_selected_something"] = dist["selected"] > 0
        return dist, checks
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def readme_rows(out: dict) -> list[dict[str, str]]:
    """The README's rows, from this run's numbers."""
    rows = []
    sn = out.get("single_node")
    if sn:
        r, sec = sn["ratios"], sn["seconds_min"]
        ours = sec["ours_numpy" if sn["auto_device"] == "numpy" else "ours_torch_cpu"]
        ref = sn["reference"]
        lean_key = next(k for k in r if k.startswith("lean_over_ours"))
        prod = sn["products"]
        explain_flops = prod["gflop"] / prod["gflop_without_explanations"] - 1
        runs = sn["seconds_all_rounds"]["ours_numpy_no_explain"]
        spread = max(runs) / min(runs) - 1
        rows.append(
            {
                "run": sn.get("run"),
                "setting": (
                    f"{sn['n'] // 1000}K x {sn['d']}, budget {sn['m']:,}, tau {sn['tau']}, "
                    f"{sn['rejected_share_of_scanned']:.0%} of the "
                    f"{sn['pool_stats']['scanned']:,} scanned rows near-duplicates (planted)"
                ),
                "result": (
                    f"{ours:.2f} s with `device: auto` ({sn['auto_device']}; min of "
                    f"{sn['rounds']} interleaved runs): {r['reference_over_ours_extrapolated']}x "
                    "DEITA's batch-1 filter (extrapolated: per-row cost fitted on probes and "
                    f"summed over our scanned rows; measured prefix {ref['measured_prefix_rows']:,}"
                    f" rows in {ref['measured_prefix_s']:.0f} s, its picks equal ours), "
                    f"{r[lean_key]}x a lean per-row loop ({sn['lean']['how']}), "
                    f"{r['ours_over_bare_products']}x the bare similarity products it computes; "
                    f"numpy {sec['ours_numpy']:.2f} s vs torch CPU {sec['ours_torch_cpu']:.2f} s;"
                    " explaining every rejected row (`rejected_by`) adds "
                    f"{explain_flops:.1%} to the product flops and measured "
                    f"{r['explain_over_no_explain_numpy']}x (numpy) / "
                    f"{r['explain_over_no_explain_torch_cpu']}x (torch) with vs without, "
                    f"where runs of one side spread over {spread:.0%}"
                ),
            }
        )
        cal = sn["calibration"]
        rows.append(
            {
                "run": sn.get("run"),
                "setting": f"tau calibration on the same pool ({len(cal['tau_curve']['tau'])} taus)",
                "result": (
                    f"`tau_curve`: {cal['tau_curve_s']:.1f} s for the whole grid; "
                    f"`nearest_neighbor_cosines` ({cal['nearest_neighbor']['method']}): "
                    f"{cal['nearest_neighbor']['seconds']:.1f} s"
                ),
            }
        )
    di = out.get("distributed")
    if di:
        chk = di["single_node_check"]
        rows.append(
            {
                "run": di.get("run"),
                "setting": (
                    f"distributed, {di['n'] / 1e6:g}M x {di['d']}, budget {di['m']:,}, "
                    f"{di['shards']} shard actors on this machine"
                ),
                "result": (
                    f"{di['total_s']:.0f} s (shards' Parquet load {di['shard_load_s']:.0f} s), "
                    f"driver peak RSS {di['driver_peak_rss_gib']:.2f} GiB; ids, every row's "
                    "status and what rejected it equal the single-node method's on the same "
                    f"rows ({chk['single_node_s']:.0f} s, embeddings memory-mapped)"
                ),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument(
        "--part",
        choices=("all", "single", "distributed"),
        default="all",
        help="run only the single-node or only the distributed measurements",
    )
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds (5; quick: 2)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--_driver", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--_single", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--_write", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write:
        write_pool(args._write[0], int(args._write[1]), int(args._write[2]), 50_000)
        return
    if args._driver:
        folder, m, tau, block, shards = args._driver
        out = distributed_driver(folder, int(m), float(tau), int(shards), int(block))
        print(json.dumps(out))
        return
    if args._single:
        folder, m, tau, block = args._single
        print(json.dumps(single_node_check(folder, int(m), float(tau), int(block))))
        return
    if args.quick:
        cfg = dict(n=20_000, d=256, m=1_000, ref_s=5, lean_s=20, dist_n=100_000, dist_m=2_000)
    else:
        cfg = dict(n=100_000, d=1024, m=5_000, ref_s=60, lean_s=60, dist_n=1_000_000, dist_m=10_000)
    repeat = args.repeat or (2 if args.quick else 5)
    out: dict = {"quick": args.quick, "machine": {"load_avg_at_start": list(os.getloadavg())}}
    checks: dict[str, bool] = {}
    facts: dict = {}
    # Distributed first, while this process is still small (see distributed()).
    if args.part in ("all", "distributed"):
        out["distributed"], c = distributed(cfg["dist_n"], cfg["d"], cfg["dist_m"], 0.9, 4, 1024)
        checks.update(c)
        facts["distributed"] = out["distributed"]
    if args.part in ("all", "single"):
        res, c, f = single_node(
            cfg["n"], cfg["d"], cfg["m"], 0.9, 1024, cfg["ref_s"], cfg["lean_s"], repeat
        )
        checks.update(c)
        facts["single_node"] = f
        out["single_node"] = res
    require(NAME, checks, facts)
    for part in ("distributed", "single_node"):
        if part in out:
            out[part]["run"] = {**run_facts(), "checks": sorted(checks)}
    if args.part != "all":
        keep_other_part(out, args.quick)
    out["checks"] = checks
    out["readme"] = readme_rows(out)
    finish(NAME, out, args.out)


def run_facts() -> dict:
    """When and on what a part was measured (a part may come from an earlier run)."""
    from benchmarks._common import machine_info

    m = machine_info()
    return {k: m[k] for k in ("date", "commit", "uncommitted_changes", "cores", "load_avg")}


def keep_other_part(out: dict, quick: bool) -> None:
    """With ``--part``, keep the other part of the last recorded run of the same kind (full or
    quick) in the result, with the run it came from (each README row names its run)."""
    from benchmarks._common import results_dir

    path = results_dir() / f"{NAME}.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if bool(old.get("quick")) != quick:
        return
    for part in ("distributed", "single_node"):
        if part not in out and part in old and "run" in old[part]:
            out[part] = old[part]


if __name__ == "__main__":
    main()

"""The exact distributed method (frontier algorithm) equals the oracle and the single-node method.

Pools are written as the embedder writes them (Parquet: id, seq, evol_score, embedding as
fixed_size_list) in several files and row groups; shard actors read their row ranges
themselves. The multi-node run uses ``ray.cluster_utils.Cluster`` in a subprocess (it cannot
share a process with the session's local Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_greedy import assert_same_explanation, oracle, oracle_explained, planted_pool

from deita_ray.data.sink import parquet_files
from deita_ray.selection.distributed import (
    SelectShard,
    ShardedPool,
    keys_before,
    select_distributed,
)
from deita_ray.selection.greedy import select_diverse
from deita_ray.selection.pool import DuplicateSeqError, load_embed_pool, load_pool, plan_shards

REPO = Path(__file__).resolve().parents[2]


def write_embed_parquet(
    folder: Path,
    emb: np.ndarray,
    scores: np.ndarray,
    seq: np.ndarray,
    files: int = 3,
    row_group_size: int = 37,
    null_embedding: tuple[int, ...] = (),
) -> list[str]:
    """Write a pool as the embed stage does; NaN scores become nulls. Returns the ids."""
    folder.mkdir(parents=True, exist_ok=True)
    n, d = emb.shape
    ids = [f"row-{int(s)}" for s in seq]
    value_type = pa.float16() if emb.dtype == np.float16 else pa.float32()
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        a, b = bounds[f], bounds[f + 1]
        flat = pa.array(emb[a:b].reshape(-1), value_type)
        mask = np.array([i in null_embedding for i in range(a, b)], bool)
        col = pa.FixedSizeListArray.from_arrays(flat, d, mask=pa.array(mask))
        t = pa.table(
            {
                "id": pa.array(ids[a:b], pa.string()),
                "seq": pa.array(seq[a:b], pa.int64()),
                "evol_score": pa.array(scores[a:b], pa.float64(), mask=np.isnan(scores[a:b])),
                "embedding": col,
            }
        )
        pq.write_table(t, folder / f"part-{f:05d}.parquet", row_group_size=row_group_size)
    return ids


def test_plan_covers_every_row_once(tmp_path):
    rng = np.random.default_rng(0)
    emb, scores, seq = planted_pool(rng, 101, 4, 5)
    write_embed_parquet(tmp_path, emb, scores, seq, files=4, row_group_size=10)
    files = parquet_files(str(tmp_path))
    whole = load_pool(plan_shards(files, 1)[0][0])
    for p in (1, 2, 3, 5, 7, 150):
        plans, total = plan_shards(files, p)
        assert total == 101 and len(plans) == p
        seqs = np.concatenate([load_pool(pl).seq for pl in plans if pl])
        assert seqs.tolist() == whole.seq.tolist()


def test_shard_logic_in_process(tmp_path):
    """SelectShard without Ray: sorted order, survivors, keys and counts."""
    rng = np.random.default_rng(1)
    emb, scores, seq = planted_pool(rng, 60, 8, 6)
    scores[3] = np.nan
    write_embed_parquet(tmp_path, emb, scores, seq, files=2)
    files = parquet_files(str(tmp_path))
    shard = SelectShard(plan_shards(files, 1)[0][0], 0, device="numpy")
    shard.reset(0.9, 10)
    info = shard.info()
    assert info["candidates"] == 59 and info["missing_score"] == 1 and info["dim"] == 8
    keys = list(zip(shard.neg_score.tolist(), shard.seq.tolist(), strict=True))
    assert keys == sorted(keys)
    out = shard.next_round(None, 25)  # nothing accepted yet: every row survives
    assert len(out["ids"]) == 25 and out["last"] == keys[24] and not out["exhausted"]
    assert shard.count_upto(*keys[24]) == 25 and shard.count_upto(-1e9, 0) == 0


@pytest.mark.parametrize("seed", range(3))
def test_distributed_matches_oracle(ray_local, tmp_path, seed):
    """1-5 shards, many block sizes, three taus, m below and above the pool: oracle ids."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(150, 400))
    d = int(rng.choice([8, 32]))
    emb, scores, seq = planted_pool(rng, n, d, int(rng.integers(10, 60)), ties=seed != 1)
    scores[rng.choice(n, 5, replace=False)] = np.nan
    if seed == 2:
        emb = emb.astype(np.float16)
    write_embed_parquet(tmp_path, emb, scores, seq, files=1 + seed, null_embedding=(7,))
    files = parquet_files(str(tmp_path))
    pool = load_pool(plan_shards(files, 1)[0][0])
    cases = [(0.5, n + 10), (0.9, n // 3), (0.99, n // 2)]
    explained = {c: oracle_explained(pool.embeddings, pool.scores, pool.seq, *c) for c in cases}
    want = {c: explained[c]["picks"] for c in cases}
    single = {}
    for tau, budget in cases:
        single[tau] = select_diverse(
            pool.embeddings, pool.scores, tau, budget, seq=pool.seq, ids=pool.ids, block_size=64
        )
        assert single[tau].indices.tolist() == want[(tau, budget)]
    shard_counts = ((1, 3, 5), (2, 4), (1, 5))[seed]
    for shards in shard_counts:
        with ShardedPool(files, shards, device="numpy", shard_num_cpus=0.01) as sp:
            for tau, budget in cases:
                for block in (3 + seed, 64, 1000):
                    r = sp.select(tau, budget, block_size=block, driver_device="numpy")
                    assert r.indices.tolist() == want[(tau, budget)], (tau, shards, block)
                    s1 = single[tau]
                    assert r.ids == s1.ids
                    # What each row was rejected by: the oracle's, bit for bit.
                    assert_same_explanation(r, explained[(tau, budget)], (tau, shards, block))
                    np.testing.assert_allclose(r.max_sim, s1.max_sim, atol=1e-5, equal_nan=True)
                    for key in (
                        "pool",
                        "candidates",
                        "scanned",
                        "rejected_for_similarity",
                        "not_reached",
                        "missing_score",
                        "invalid_embedding",
                        "zero_vector",
                    ):
                        assert r.stats[key] == s1.stats[key], key


def test_select_distributed_one_shot_torch(ray_local, tmp_path):
    """The one-shot entry point with torch on the shards and the driver."""
    rng = np.random.default_rng(5)
    emb, scores, seq = planted_pool(rng, 300, 16, 30)
    write_embed_parquet(tmp_path, emb, scores, seq, files=2)
    files = parquet_files(str(tmp_path))
    r = select_distributed(
        files, 0.9, 100, 2, block_size=32, device="cpu", shard_num_cpus=0.01, driver_device="cpu"
    )
    want = oracle_explained(emb, scores, seq, 0.9, 100)
    assert r.indices.tolist() == want["picks"]
    assert_same_explanation(r, want)


def test_distributed_budget_edges(ray_local, tmp_path):
    rng = np.random.default_rng(9)
    emb, scores, seq = planted_pool(rng, 80, 8, 8)
    write_embed_parquet(tmp_path, emb, scores, seq, files=2)
    files = parquet_files(str(tmp_path))
    with ShardedPool(files, 3, device="numpy", shard_num_cpus=0.01) as sp:
        for budget in (0, 1):
            r = sp.select(0.9, budget, block_size=16, driver_device="numpy")
            single = select_diverse(emb, scores, 0.9, budget, seq=seq)
            assert r.indices.tolist() == single.indices.tolist()
            assert r.stats["scanned"] == single.stats["scanned"] == budget
    empty = tmp_path / "empty"
    write_embed_parquet(empty, emb[:0], scores[:0], seq[:0], files=1)
    r = select_distributed(
        parquet_files(str(empty)),
        0.9,
        5,
        2,
        device="numpy",
        shard_num_cpus=0.01,
        driver_device="numpy",
    )
    assert len(r) == 0 and r.stats["pool"] == 0


CLUSTER_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from deita_ray.data.sink import parquet_files
from deita_ray.selection.distributed import select_distributed

folder, out = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
results = []
try:
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    for tau, budget, shards, block in ((0.9, 120, 3, 16), (0.5, 500, 5, 7), (0.99, 60, 2, 64)):
        r = select_distributed(parquet_files(folder), tau, budget, shards, block_size=block,
                               device="numpy", shard_num_cpus=0.3, scheduling_strategy="SPREAD",
                               driver_device="numpy")
        results.append({"tau": tau, "budget": budget, "shards": shards, "block": block,
                        "ids": r.ids, "nodes": r.stats["shard_nodes"],
                        "status": r.row_status.tolist(), "rejected_by": r.rejected_by.tolist(),
                        "rejected_sim": [x.hex() for x in r.rejected_sim.tolist()]})
finally:
    ray.shutdown()
    cluster.shutdown()
json.dump(results, open(out, "w"))
"""


@pytest.mark.slow
def test_distributed_on_multi_node_cluster(tmp_path):
    """Three simulated nodes (ray.cluster_utils.Cluster), shards spread across them."""
    rng = np.random.default_rng(77)
    emb, scores, seq = planted_pool(rng, 400, 16, 50)
    folder = tmp_path / "embed"
    write_embed_parquet(folder, emb, scores, seq, files=3)
    pool = load_pool(plan_shards(parquet_files(str(folder)), 1)[0][0])
    script = tmp_path / "cluster_run.py"
    script.write_text(CLUSTER_SCRIPT)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [sys.executable, str(script), str(folder), str(out)],
        check=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    results = json.loads(out.read_text())
    assert len(results) == 3
    for res in results:
        want = oracle(pool.embeddings, pool.scores, pool.seq, res["tau"], res["budget"])[0]
        assert res["ids"] == [pool.ids[i] for i in want], res["tau"]
        assert res["nodes"] >= 2  # the shards really ran on different nodes
        # The blocked single-node method explains every row exactly as the shards did.
        single = select_diverse(
            pool.embeddings, pool.scores, res["tau"], res["budget"], seq=pool.seq, block_size=64
        )
        assert res["status"] == single.row_status.tolist()
        assert res["rejected_by"] == single.rejected_by.tolist()
        assert res["rejected_sim"] == [x.hex() for x in single.rejected_sim.tolist()]
    assert any(b >= 0 for res in results for b in res["rejected_by"])  # something was explained


def test_keys_before_matches_brute_force():
    rng = np.random.default_rng(4)
    neg = -rng.integers(0, 4, 60).astype(np.float64)
    seq = rng.permutation(200)[:60]
    acc = np.lexsort((seq, neg))[:25]
    acc = acc[np.lexsort((seq[acc], neg[acc]))]
    query = np.setdiff1d(np.arange(60), acc)
    got = keys_before(neg[acc], seq[acc], neg[query], seq[query])
    want = [sum((neg[a], seq[a]) < (neg[q], seq[q]) for a in acc) for q in query]
    assert got.tolist() == want


def test_duplicate_seq_fails_at_load(ray_local, tmp_path):
    """The frontier algorithm orders rows by (-score, seq): a repeated seq is refused at load,
    within a shard and across shards, with the seq and both ids in the message."""
    rng = np.random.default_rng(3)
    emb, scores, seq = planted_pool(rng, 60, 8, 6)
    seq = np.arange(60, dtype=np.int64)
    seq[50] = seq[5]  # row 5 (file 0) and row 50 (file 1) share seq 5
    folder = tmp_path / "dup"
    ids = write_embed_parquet(folder, emb, scores, seq, files=2)
    files = parquet_files(str(folder))
    with pytest.raises(DuplicateSeqError, match=r"seq 5 .*'row-5'"):
        load_embed_pool(files)
    for shards in (1, 2, 3):
        with pytest.raises(DuplicateSeqError, match="seq 5") as err:
            ShardedPool(files, shards, device="numpy", shard_num_cpus=0.01)
        assert ids[5] in str(err.value)

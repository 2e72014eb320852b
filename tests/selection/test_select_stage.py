"""The select stage end to end on Parquet folders shaped like the score and embed outputs."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_distributed import write_embed_parquet
from test_greedy import oracle, oracle_explained, planted_pool

from deita_ray.config import PipelineConfig
from deita_ray.selection.baselines import (
    message_lengths,
    select_kcenter,
    select_random,
    select_top_score,
)
from deita_ray.selection.calibration import tau_curve
from deita_ray.selection.greedy import ROW_STATUS
from deita_ray.stages.select import run_select

MSG_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
N, D = 240, 16


def _messages(i: int, rng: np.random.Generator) -> list[dict]:
    turns = 1 + i % 3
    out = [{"role": "system", "content": "be nice"}] if i % 5 == 0 else []
    for t in range(turns):
        out.append({"role": "user", "content": f"q{i}-{t} " + "x" * int(rng.integers(0, 50))})
        out.append({"role": "assistant", "content": "y" * int(rng.integers(0, 80))})
    return out


def write_text_pool(
    folder: Path,
    seq: np.ndarray,
    scores: np.ndarray | None,
    rng: np.random.Generator,
    files: int = 2,
) -> None:
    """Canonical rows (+ score columns when ``scores`` is given), in shuffled file order."""
    folder.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(seq))
    for f, part in enumerate(np.array_split(order, files)):
        cols = {
            "id": pa.array([f"row-{int(seq[i])}" for i in part], pa.string()),
            "seq": pa.array(seq[part], pa.int64()),
            "messages": pa.array([_messages(int(seq[i]), rng) for i in part], MSG_TYPE),
            "source": pa.array(["pool.json"] * len(part)),
            "format": pa.array(["messages"] * len(part)),
            "extra": pa.array([json.dumps({"k": int(seq[i])}) for i in part]),
        }
        if scores is not None:
            cols["complexity_scores"] = pa.array([[1.0, 2.0]] * len(part), pa.list_(pa.float64()))
            cols["quality_scores"] = pa.array([[3.0, 1.0]] * len(part), pa.list_(pa.float64()))
            cols["evol_score"] = pa.array(scores[part], pa.float64(), mask=np.isnan(scores[part]))
            cols["truncated"] = pa.array([False] * len(part))
        pq.write_table(pa.table(cols), folder / f"part-{f:05d}.parquet", row_group_size=50)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> tuple[Path, dict]:
    rng = np.random.default_rng(11)
    emb, scores, seq = planted_pool(rng, N, D, 40, ties=True)
    scores[[4, 50]] = np.nan
    out = tmp_path_factory.mktemp("select_run")
    write_text_pool(out / "score", seq, scores, rng)
    write_embed_parquet(out / "embed", emb, scores, seq, files=3)
    return out, {"emb": emb, "scores": scores, "seq": seq}


def _cfg(**select) -> PipelineConfig:
    cfg = PipelineConfig()
    for k, v in select.items():
        setattr(cfg.select, k, v)
    return cfg


def _read(out: Path) -> pa.Table:
    files = sorted((out / "select").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _check_common(out: Path, result, table: pa.Table) -> None:
    assert table.column_names[:4] == ["id", "rank", "evol_score", "max_sim"]
    for col in ("seq", "messages", "source", "format", "extra"):
        assert col in table.column_names
    assert table["rank"].to_pylist() == list(range(table.num_rows))
    assert all(
        i == f"row-{s}"
        for i, s in zip(table["id"].to_pylist(), table["seq"].to_pylist(), strict=True)
    )
    c = result.counts
    c.check("select")
    assert c.rows_in == N and c.rows_out == table.num_rows
    assert not (out / "rejects" / "select").exists()  # selection is not rejection
    json.dumps(result.metrics)  # JSON-able for the report


@pytest.mark.parametrize("device", ["numpy", "auto"])
def test_deita_single_node(pool_dir, device):
    out, p = pool_dir
    res = run_select(
        _cfg(method="deita", tau=0.9, budget=60, block_size=16, device=device), str(out)
    )
    t = _read(out)
    want = oracle(p["emb"], p["scores"], p["seq"], 0.9, 60)[0]
    assert t["seq"].to_pylist() == p["seq"][want].tolist()
    assert t["evol_score"].to_pylist() == p["scores"][want].tolist()
    sims = t["max_sim"].to_pylist()
    assert sims[0] is None and all(s is not None and s <= 0.9 + 1e-6 for s in sims[1:])
    _check_common(out, res, t)
    reasons = res.counts.not_selected_by_reason
    assert reasons["missing_score"] == 2
    assert reasons["similar_to_selected"] == res.metrics["pool"]["rejected_for_similarity"]
    assert res.metrics["num_selected"] == 60 and res.metrics["tau"] == 0.9
    # The text columns are those of the score output, joined on seq.
    src = pq.read_table(out / "score").to_pandas().set_index("seq")
    first = t.slice(0, 1).to_pylist()[0]
    assert first["extra"] == src.loc[first["seq"], "extra"]


def test_deita_distributed_equals_single_node(pool_dir, ray_local):
    out, p = pool_dir
    res = run_select(
        _cfg(
            method="deita",
            tau=0.5,
            budget=1000,
            block_size=32,
            num_shards=3,
            shard_num_cpus=0.01,
            device="numpy",
        ),
        str(out),
    )
    t = _read(out)
    want = oracle(p["emb"], p["scores"], p["seq"], 0.5, 1000)[0]
    assert t["seq"].to_pylist() == p["seq"][want].tolist()
    assert res.metrics["mode"] == "distributed"
    assert "not_reached" not in res.counts.not_selected_by_reason  # budget above the pool
    _check_common(out, res, t)


def test_baselines_through_the_stage(pool_dir):
    out, p = pool_dir
    seq = p["seq"]
    src = pq.read_table(out / "score")
    src_seq = src["seq"].to_numpy()  # pool order as the stage reads it
    for method, budget in (
        ("random", 30),
        ("score", 50),
        ("instruction_length", 20),
        ("response_length", 25),
        ("kcenter", 15),
    ):
        res = run_select(_cfg(method=method, budget=budget, seed=3), str(out))
        t = _read(out)
        _check_common(out, res, t)
        got = t["seq"].to_pylist()
        if method == "random":
            want = select_random(N, budget, 3, seq=src_seq).seq.tolist()
        elif method == "score":
            want = select_top_score(p["scores"], budget, seq=seq).seq.tolist()
            assert res.counts.not_selected_by_reason == {
                "missing_score": 2,
                "below_budget_cut": N - 2 - budget,
            }
        elif method == "kcenter":
            want = select_kcenter(p["emb"], budget, p["scores"], seq).seq.tolist()
            assert t["max_sim"].to_pylist()[0] is None
        else:
            role = "user" if method == "instruction_length" else "assistant"
            lens = message_lengths(src["messages"], role)
            key = sorted(range(N), key=lambda i: (-lens[i], src_seq[i]))[:budget]
            want = [int(src_seq[i]) for i in key]
            assert all(s is None for s in t["max_sim"].to_pylist())
        assert got == want, method


def test_ingest_fallback_and_rerun(tmp_path, pool_dir):
    """Without a score folder the text comes from ingest; a re-run replaces the selection."""
    out, p = pool_dir
    run = tmp_path / "run"
    shutil.copytree(out / "embed", run / "embed")
    write_text_pool(run / "ingest", p["seq"], None, np.random.default_rng(0), files=3)
    res = run_select(_cfg(method="deita", tau=0.99, budget=10, device="numpy"), str(run))
    t = _read(run)
    assert "complexity_scores" not in t.column_names and t.num_rows == 10
    _check_common(run, res, t)
    res = run_select(_cfg(method="random", budget=7), str(run))
    assert len(os.listdir(run / "select")) == 1 and _read(run).num_rows == 7
    assert res.counts.not_selected_by_reason == {"below_budget_cut": N - 7}
    with pytest.raises(ValueError, match="evol_score"):
        run_select(_cfg(method="score", budget=7), str(run))


# ---------------------------------------------------------------------------------------------
# Why each row was not picked, and the tau calibration


def _decisions(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "decisions" / "select" / "part-00000.parquet")
    return {r["id"]: r for r in table.to_pylist()}


def test_decisions_say_why_each_row_was_not_picked(pool_dir):
    out, p = pool_dir
    tau, budget = 0.9, 60
    res = run_select(_cfg(method="deita", tau=tau, budget=budget, block_size=16), str(out))
    want = oracle_explained(p["emb"], p["scores"], p["seq"], tau, budget)
    picks = [f"row-{int(p['seq'][i])}" for i in want["picks"]]
    got = _decisions(out)
    assert len(got) == N
    for i in range(N):
        row = got[f"row-{int(p['seq'][i])}"]
        assert row["seq"] == int(p["seq"][i])
        assert row["status"] == ROW_STATUS[want["status"][i]]
        if row["status"] == "selected":
            assert picks[row["rank"]] == row["id"]
        else:
            assert row["rank"] is None
        if row["status"] == "similar_to_selected":
            assert row["rejected_by"] == picks[want["rejected_by"][i]]
            assert row["rejected_by_rank"] == want["rejected_by"][i]
            assert row["cosine"] == pytest.approx(want["rejected_sim"][i], abs=1e-12)
            assert row["cosine"] > tau
        else:
            assert row["rejected_by"] is None and row["cosine"] is None
        score = p["scores"][i]
        assert row["selection_score"] == (None if np.isnan(score) else score)
    # The decisions agree with the stage's counts.
    by_status = Counter(r["status"] for r in got.values())
    assert by_status.pop("selected") == res.counts.rows_out
    assert dict(by_status) == res.counts.not_selected_by_reason


def test_decisions_equal_across_methods(pool_dir, ray_local):
    out, _ = pool_dir
    common = {"method": "deita", "tau": 0.8, "budget": 70, "block_size": 32, "device": "numpy"}
    run_select(_cfg(**common), str(out))
    single = _decisions(out)
    run_select(_cfg(**common, num_shards=3, shard_num_cpus=0.01), str(out))
    assert _decisions(out) == single
    assert any(r["status"] == "similar_to_selected" for r in single.values())


def test_baseline_decisions(pool_dir):
    out, p = pool_dir
    res = run_select(_cfg(method="score", budget=50), str(out))
    got = Counter(r["status"] for r in _decisions(out).values())
    assert got == {"selected": 50, "missing_score": 2, "below_budget_cut": N - 52}
    assert res.metrics["calibration"] is None
    # The decisions carry the value select.score gave each row (here an expression).
    run_select(_cfg(method="score", budget=50, score="-2 * evol_score"), str(out))
    got = _decisions(out)
    for s, want in zip(p["seq"], p["scores"], strict=True):
        score = got[f"row-{int(s)}"]["selection_score"]
        assert score == (None if np.isnan(want) else -2 * want)


def test_tau_calibration_in_the_metrics(pool_dir, ray_local):
    out, p = pool_dir
    res = run_select(
        _cfg(method="deita", tau=0.9, budget=60, device="numpy", tau_grid=[0.95, 0.5, 0.9]),
        str(out),
    )
    cal = res.metrics["calibration"]
    want = tau_curve(p["scores"], p["emb"], [0.5, 0.9, 0.95], 60, seq=p["seq"], device="numpy")
    for key in ("tau", "selected", "scanned", "budget_filled"):
        assert cal["curve"][key] == want[key], key
    assert cal["curve"]["selected"][1] == res.counts.rows_out  # the configured tau's point
    nn = cal["nearest_neighbour"]
    assert nn["rows"] == N and sum(nn["histogram"]["counts"]) == N
    assert len(nn["share_above"]) == 3 and nn["share_above"] == sorted(nn["share_above"])[::-1]
    json.dumps(res.metrics)
    off = run_select(_cfg(method="deita", tau=0.9, budget=60, calibrate=False), str(out))
    assert off.metrics["calibration"] is None
    dist = run_select(
        _cfg(method="deita", tau=0.9, budget=60, num_shards=2, shard_num_cpus=0.01), str(out)
    )
    assert dist.metrics["calibration"] is None  # the pool is not on one node

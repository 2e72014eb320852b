"""Selection on any score: the scorers' row columns travel score -> embed -> select exactly as
evol_score does, and ``select.score`` (a column or an expression) orders the greedy (single
node and distributed alike), the top-k, k-center's first pick; the length baselines read the
length scorer's columns.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from deita_ray.config import ActorPoolConfig, PipelineConfig, ScorerConfig
from deita_ray.selection.score_expr import parse

EXPR = "complexity * quality - ppl_nll / 10"


@pytest.fixture(scope="module")
def job(ray_local, shared_data: Path, canonical_table, tiny_model_cfg, tmp_path_factory):
    """A job folder after the real score and embed stages (tiny model, transformers)."""
    from deita_ray.stages.embed import run_embed
    from deita_ray.stages.score import run_score

    out = tmp_path_factory.mktemp("select_score")
    records = json.loads((shared_data / "alpaca/alpaca_data.json").read_text())[:60]
    (out / "ingest").mkdir()
    table = canonical_table(records, "a")
    pq.write_table(table.slice(0, 30), out / "ingest/part-00000.parquet")
    pq.write_table(table.slice(30), out / "ingest/part-00001.parquet")
    model = tiny_model_cfg("hf", 512)
    cfg = PipelineConfig()
    cfg.score.scorers = [
        ScorerConfig(kind="deita_complexity", model=model, columns=["turn", "row"]),
        ScorerConfig(kind="deita_quality", model=model, columns=["turn", "row"]),
        ScorerConfig(kind="perplexity", model=model),
        ScorerConfig(kind="length", model=dataclasses.replace(model)),
    ]
    cfg.score.resources = ActorPoolConfig(concurrency=1, num_cpus=1, batch_size=32)
    cfg.embed.model = model
    cfg.embed.max_length = 512
    cfg.embed.resources = ActorPoolConfig(concurrency=1, num_cpus=1, batch_size=32)
    cfg.select.budget = 10
    cfg.select.tau = 0.9999
    cfg.select.device = "numpy"
    run_score(cfg, str(out))
    run_embed(cfg, str(out))
    return cfg, out


def _select(cfg: PipelineConfig, out: Path, **select) -> tuple[list[str], dict, list[float]]:
    from deita_ray.stages.select import run_select

    cfg = dataclasses.replace(cfg, select=dataclasses.replace(cfg.select, **select))
    res = run_select(cfg, str(out))
    t = pq.read_table(out / "select/part-00000.parquet")
    name = "evol_score" if cfg.select.score == "evol_score" else "select_score"
    return t["id"].to_pylist(), res.metrics, t[name].to_pylist()


def _pool_scores(out: Path, text: str) -> dict[str, float]:
    t = pds.dataset(str(out / "score"), format="parquet").to_table()
    values = parse(text).evaluate({c: t[c] for c in parse(text).names})
    return dict(zip(t["id"].to_pylist(), values.tolist(), strict=True))


def test_embed_carries_the_row_columns(job):
    _, out = job
    names = pds.dataset(str(out / "embed"), format="parquet").schema.names
    for col in ("complexity", "quality", "ppl", "ppl_nll", "ppl_tokens", "response_chars"):
        assert col in names, col
    assert "complexity_scores" not in names and "messages" not in names  # row columns only


def test_greedy_orders_by_an_expression_single_and_distributed(job):
    from deita_ray.selection.distributed import load_pool, plan_shards
    from deita_ray.selection.greedy import select_diverse
    from deita_ray.stages.select import _check_score_columns

    cfg, out = job
    ids, metrics, scores = _select(cfg, out, method="deita", score=EXPR)
    want = _pool_scores(out, EXPR)
    assert metrics["score"] == EXPR and len(ids) == 10
    np.testing.assert_allclose(scores, [want[i] for i in ids], rtol=1e-12)
    assert scores == sorted(scores, reverse=True)  # tau near 1: nearly pure score order
    # the same greedy on arrays built here from the score output's own columns
    files = sorted(str(p) for p in (out / "embed").glob("*.parquet"))
    _check_score_columns(files, parse(EXPR), "embed")
    pool = load_pool(plan_shards(files, 1)[0][0], "evol_score")
    by_id = np.array([want[i] for i in pool.ids])
    direct = select_diverse(pool.embeddings, by_id, 0.9999, 10, seq=pool.seq, ids=pool.ids)
    assert direct.ids == ids
    dist_ids, dist_metrics, _ = _select(cfg, out, method="deita", score=EXPR, num_shards=2)
    assert dist_ids == ids and dist_metrics["mode"] == "distributed"
    default_ids, default_metrics, _ = _select(cfg, out, method="deita")
    assert default_ids != ids and "evol_score" in default_metrics


def test_top_k_kcenter_and_length_baselines(job):
    cfg, out = job
    want = _pool_scores(out, "-ppl_nll")
    ids, _, scores = _select(cfg, out, method="score", score="-ppl_nll")
    assert ids == sorted(want, key=lambda i: -want[i])[:10]
    assert scores == [want[i] for i in ids]
    k_ids, _, _ = _select(cfg, out, method="kcenter", score="quality")
    quality = _pool_scores(out, "quality")
    assert k_ids[0] == max(quality, key=lambda i: quality[i])
    t = pds.dataset(str(out / "score"), format="parquet").to_table()
    chars = dict(zip(t["id"].to_pylist(), t["response_chars"].to_pylist(), strict=True))
    seq = dict(zip(t["id"].to_pylist(), t["seq"].to_pylist(), strict=True))
    l_ids, l_metrics, _ = _select(cfg, out, method="response_length")
    assert l_metrics["length_source"] == "length_scorer"
    assert l_ids == sorted(chars, key=lambda i: (-chars[i], seq[i]))[:10]


def test_a_column_the_embed_output_lacks_fails_naming_select_score(job, tmp_path):
    import shutil

    cfg, out = job
    copy = tmp_path / "job"
    shutil.copytree(out / "embed", copy / "embed")
    for f in (copy / "embed").glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["ppl_nll"]), f)
    with pytest.raises(ValueError, match=r"select.score='-ppl_nll' reads 'ppl_nll'"):
        _select(cfg, copy, method="deita", score="-ppl_nll")

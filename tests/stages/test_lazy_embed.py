"""``select.lazy_embed`` through the pipeline on the demo pool (ingest -> score -> embed ->
select, the tiny LLaMA as embedder, the length scorer as score): the lazy run's selection and
decision records equal the full-embed run's; it embeds only about the rows the greedy read;
the embed stage records its deferral; an interrupted lazy select resumes from the chunks it
wrote, embedding only the rest.

The embedder runs one row per forward pass (``hf_batch_size: 1``), so a row's vector does not
depend on which rows share its batch: the two runs embed every row they share bit for bit
alike, and their cosines are equal, not just close.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from deita_ray.selection.greedy import normalize_rows
from deita_ray.selection.pool import embedding_matrix

SCORE = "response_chars + instruction_chars / 10"


def _job(out: Path, tiny: Path, stages: list[str], **select) -> dict:
    model = {
        "path": str(tiny),
        "backend": "hf",
        "dtype": "float32",
        "max_model_len": 256,
        "hf_batch_size": 1,
    }
    return {
        "stages": stages,
        "demo_pool": True,
        "output": {"dir": str(out), "rows_per_part": 64, "progress_every_s": 0},
        "score": {"scorers": [{"kind": "length"}]},
        "embed": {
            "model": model,
            "max_length": 128,
            "resources": {"concurrency": 1, "num_cpus": 1, "batch_size": 8},
        },
        "select": {"method": "deita", "score": SCORE, "device": "numpy", **select},
    }


def _run(data: dict) -> dict:
    from deita_ray import pipeline
    from deita_ray.config import load_config

    return pipeline.run(load_config(data=data))


def _decisions(out: Path) -> dict[str, dict]:
    t = pq.read_table(out / "decisions/select/part-00000.parquet")
    return {r["id"]: r for r in t.to_pylist()}


def _embed_rows(out: Path) -> int:
    files = sorted((out / "embed").glob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


@pytest.fixture(scope="module")
def runs(ray_local, tiny_llama, tmp_path_factory):
    """The full run (tau from its own embeddings: the median nearest-neighbour cosine, so the
    greedy rejects many rows) and the lazy run, budget 40."""
    work = tmp_path_factory.mktemp("lazy_embed")
    full, lazy = work / "full", work / "lazy"
    _run(_job(full, tiny_llama, ["ingest", "score", "embed"]))
    t = pds.dataset(str(full / "embed"), format="parquet").to_table(columns=["embedding"])
    u = normalize_rows(embedding_matrix(t["embedding"])[0]).astype(np.float64)
    sims = u @ u.T
    np.fill_diagonal(sims, -1)
    tau = float(np.quantile(sims.max(axis=1), 0.5))
    select = {"tau": tau, "budget": 40}
    report_full = _run(_job(full, tiny_llama, ["ingest", "score", "embed", "select"], **select))
    job_lazy = _job(lazy, tiny_llama, ["ingest", "score", "embed", "select"], **select)
    job_lazy["select"]["lazy_embed"] = True
    report_lazy = _run(job_lazy)
    return {"full": (full, report_full), "lazy": (lazy, report_lazy), "select": select}


def test_lazy_selection_records_equal_the_full_runs(runs):
    (full, rep_full), (lazy, rep_lazy) = runs["full"], runs["lazy"]
    a = pq.read_table(full / "select/part-00000.parquet")
    b = pq.read_table(lazy / "select/part-00000.parquet")
    assert a["id"].to_pylist() == b["id"].to_pylist()
    assert len(a) == runs["select"]["budget"]
    assert a["select_score"].to_pylist() == b["select_score"].to_pylist()
    # max_sim is the float32 kernel's value (greedy.py): chunks cut the products elsewhere.
    np.testing.assert_allclose(
        a["max_sim"].to_numpy(zero_copy_only=False),
        b["max_sim"].to_numpy(zero_copy_only=False),
        atol=1e-6,
    )
    da, db = _decisions(full), _decisions(lazy)
    # Every row of the full run's pool is in the lazy run's decisions; the lazy run also lists
    # the rows the full run's embedder rejected that it never embedded (not_reached).
    assert set(da) <= set(db)
    assert all(db[i]["status"] == "not_reached" for i in set(db) - set(da))
    examined = {"selected", "similar_to_selected"}
    for rid, want in da.items():
        got = db[rid]
        if want["status"] in examined or got["status"] in examined:
            assert got == want, rid
        else:  # not reached by the greedy: the same in both (or never embedded)
            assert got["status"] == want["status"] == "not_reached", rid
    similar = [r for r in da.values() if r["status"] == "similar_to_selected"]
    assert similar, "tau should make the greedy reject rows"
    pool_full = rep_full["stages"]["select"]["metrics"]["pool"]
    pool_lazy = rep_lazy["stages"]["select"]["metrics"]["pool"]
    for key in ("selected", "scanned", "rejected_for_similarity", "missing_score"):
        assert pool_lazy[key] == pool_full[key], key


def test_lazy_embeds_only_about_what_the_greedy_read(runs):
    (_, rep_full), (lazy, rep_lazy) = runs["full"], runs["lazy"]
    st = rep_lazy["stages"]
    assert st["embed"]["rows_in"] == 0 and st["embed"]["rows_out"] == 0
    assert st["embed"]["metrics"]["deferred_to"] == "select"
    sel = st["select"]
    lz = sel["metrics"]["lazy_embed"]
    scanned = sel["metrics"]["pool"]["scanned"]
    assert lz["rows_examined"] == scanned
    written = _embed_rows(lazy) + sum(
        pq.ParquetFile(f).metadata.num_rows for f in (lazy / "rejects/embed").glob("*.parquet")
    )
    assert written == lz["rows_embedded"] >= scanned
    assert lz["rows_embedded"] < rep_full["stages"]["embed"]["rows_in"]
    assert lz["rows_not_embedded"] == lz["candidates"] - lz["rows_embedded"]
    # The select stage's own accounting: every scored row is selected, not selected or a reject
    # of the embedder; rows_in counted from the scored pool.
    assert sel["rows_in"] == st["score"]["rows_out"]
    assert sel["rows_in"] == sel["rows_out"] + sel["rows_rejected"] + sel["rows_not_selected"]
    cal = sel["metrics"]["calibration"]
    assert cal is not None and "examined" in cal["computed_on"]
    assert cal["pool"] == scanned


def test_interrupted_lazy_select_resumes_from_its_chunks(runs, tiny_llama, tmp_path, monkeypatch):
    """A lazy select that dies after its first chunks keeps them; the re-run embeds only the
    rest (and recomputes the greedy's state from them), and selects what the full run does."""
    import shutil

    from deita_ray.config import load_config
    from deita_ray.selection.lazy import LazySelection
    from deita_ray.stages.select import run_select

    (full, _), (lazy, _) = runs["full"], runs["lazy"]
    out = tmp_path / "resume"
    for stage in ("ingest", "score"):
        shutil.copytree(lazy / stage, out / stage)
    job = _job(out, tiny_llama, ["select"], **runs["select"])
    job["select"]["lazy_embed"] = True
    cfg = load_config(data=job)
    # Small chunks, so the run is interrupted with rows still to embed.
    cfg = dataclasses.replace(
        cfg,
        embed=dataclasses.replace(
            cfg.embed, resources=dataclasses.replace(cfg.embed.resources, batch_size=4)
        ),
    )
    real_feed, fed = LazySelection.feed, []

    def dying_feed(self, rows, emb, rejected):
        if len(fed) == 2:
            raise KeyboardInterrupt("driver killed")
        fed.append(len(rows))
        return real_feed(self, rows, emb, rejected)

    monkeypatch.setattr(LazySelection, "feed", dying_feed)
    with pytest.raises(KeyboardInterrupt):
        run_select(cfg, str(out))
    monkeypatch.undo()
    kept = _embed_rows(out)
    assert kept >= sum(fed) > 0
    res = run_select(cfg, str(out))
    lz = res.metrics["lazy_embed"]
    assert lz["rows_reused"] >= sum(fed)
    assert lz["rows_embedded"] + lz["rows_reused"] >= res.metrics["pool"]["scanned"]
    want = pq.read_table(full / "select/part-00000.parquet")["id"].to_pylist()
    got = pq.read_table(out / "select/part-00000.parquet")["id"].to_pylist()
    assert got == want
    assert _decisions(out) == _decisions(lazy)

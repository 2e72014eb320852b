"""The whole job end to end on a real local Ray cluster, the real vLLM CPU engine, real DeepSpeed.

A tiny random LLaMA stands in for every model so that the suite stays fast; the quickstart's
real SmolLM2 run is exercised by `make demo` and benchmarks/pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from deita_ray.config import load_config
from deita_ray.pipeline import read_manifest, run

pytestmark = pytest.mark.slow


def _model(path: Path, backend: str = "vllm") -> dict:
    return {
        "path": str(path),
        "backend": backend,
        "dtype": "float32",
        "max_model_len": 512,
        "enforce_eager": True,
        "kv_cache_memory_bytes": 64 * 1024 * 1024,
    }


def job_dict(model: Path, out_dir: Path, backend: str = "vllm", stages=None) -> dict:
    pool = {"concurrency": 1, "num_cpus": 1, "batch_size": 64}
    return {
        "stages": stages or ["ingest", "score", "embed", "select", "sft"],
        "demo_pool": True,
        "output": {"dir": str(out_dir)},
        "score": {
            "complexity_model": _model(model, backend),
            "quality_model": _model(model, backend),
            "resources": pool,
        },
        "embed": {"model": _model(model, backend), "max_length": 256, "resources": pool},
        "select": {"method": "deita", "tau": 0.9, "budget": 24, "block_size": 8},
        "sft": {
            "epochs": 1,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "max_length": 256,
            "learning_rate": 1e-3,
            "precision": "fp32",
            "num_workers": 1,
            "zero_stage": 2,
        },
    }


def _read(path: Path, columns=None):
    return pads.dataset(str(path), format="parquet").to_table(columns=columns)


def _rows(path: Path) -> int:
    return pads.dataset(str(path), format="parquet").count_rows() if path.exists() else 0


@pytest.fixture(scope="module")
def quick_run(ray_local, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out"
    cfg = load_config(data=job_dict(tiny_llama, out))
    report = run(cfg)
    return cfg, out, report


def test_every_output_exists_and_counts_add_up(quick_run):
    cfg, out, report = quick_run
    for stage in ("ingest", "score", "embed", "select"):
        assert any((out / stage).glob("*.parquet")), stage
    assert (out / "sft" / "final" / "config.json").exists()
    assert (out / "report.json").exists() and (out / "manifest.json").exists()
    saved = json.loads((out / "report.json").read_text())
    for stage in cfg.stages:
        s = saved["stages"][stage]
        assert s["rows_in"] == s["rows_out"] + s["rows_rejected"], stage
        assert s["rows_rejected"] == sum(s["rejected_by_reason"].values())
        # what the report says is what is on disk
        if stage in ("ingest", "score", "embed"):
            assert _rows(out / stage) == s["rows_out"]
            assert _rows(out / "rejects" / stage) == s["rows_rejected"]
    # the stages chain: what one writes, the next reads
    assert saved["stages"]["score"]["rows_in"] == saved["stages"]["ingest"]["rows_out"]
    assert saved["stages"]["embed"]["rows_in"] == saved["stages"]["score"]["rows_out"]
    # the demo pool carries deliberately bad rows: they are rejected, with reasons, not lost
    assert saved["stages"]["ingest"]["rows_rejected"] > 0
    rejects = _read(out / "rejects" / "ingest")
    assert all(rejects["reason"].to_pylist()) and all(r for r in rejects["raw"].to_pylist())


def test_selection_obeys_tau_and_budget(quick_run):
    cfg, out, _ = quick_run
    sel = _read(out / "select").to_pydict()
    ids = sel["id"]
    assert 0 < len(ids) <= cfg.select.budget and len(set(ids)) == len(ids)
    assert sel["rank"] == sorted(sel["rank"]) == list(range(len(ids)))
    emb = _read(out / "embed", ["id", "embedding"]).to_pydict()
    vec = dict(zip(emb["id"], emb["embedding"], strict=True))
    x = np.array([vec[i] for i in ids], dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    assert sims.max() <= cfg.select.tau + 1e-6
    scores = sel["evol_score"]
    assert scores == sorted(scores, reverse=True)
    assert "messages" in sel  # the selection is directly a training set


def test_checkpoint_loads_and_generates(quick_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, report = quick_run
    final = out / "sft" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    ids = tok("USER: hello ASSISTANT:", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4
    assert report["stages"]["sft"]["rows_out"] > 0


def test_rerun_skips_finished_stages_and_budget_change_reruns_select_on(quick_run):
    cfg, out, _ = quick_run
    before = read_manifest(str(out))["stages"]
    report = run(cfg)
    assert all(report["stages"][s].get("skipped") for s in cfg.stages)
    cfg2 = load_config(
        data=job_dict(Path(cfg.embed.model.path), out), overrides=["select.budget=12"]
    )
    report2 = run(cfg2)
    after = read_manifest(str(out))["stages"]
    for stage in ("ingest", "score", "embed"):
        assert report2["stages"][stage].get("skipped")
        assert after[stage]["finished_at"] == before[stage]["finished_at"]
    for stage in ("select", "sft"):
        assert not report2["stages"][stage].get("skipped")
        assert after[stage]["finished_at"] > before[stage]["finished_at"]
    assert _rows(out / "select") <= 12

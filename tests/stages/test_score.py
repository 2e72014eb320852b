"""The score stage on the tiny random LLaMA: real vLLM CPU engine, real transformers, real Ray.

Engines are module-scoped (one vLLM scorer, one transformers scorer) and shared by the tests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from deita_ray.config import ActorPoolConfig, PipelineConfig
from deita_ray.data.formats import CANONICAL_SCHEMA, extract_turns
from deita_ray.scoring import (
    DigitTokenError,
    PromptTooLong,
    complexity_spec,
    expected_score,
    fit_prompt,
    quality_spec,
    resolve_digit_ids,
    water_fill,
)
from deita_ray.stages.score import score_table
from deita_ray.templates import COMPLEXITY_PIECES, QUALITY_PIECES, complexity_prompt

MAX_LEN = 512
N_ALPACA = 200
N_CONV = 40


@pytest.fixture(scope="module")
def pool(shared_data: Path, canonical_table) -> pa.Table:
    """Alpaca rows (single turn) and multi-turn ShareGPT rows from ../shared/data."""
    alpaca = json.loads((shared_data / "alpaca/alpaca_data.json").read_text())[:N_ALPACA]
    convs = json.loads((shared_data / "fastchat/dummy_conversation.json").read_text())
    # the dummy file is templated: take conversations with distinct openings and 2+ turns
    seen, multi = set(), []
    for c in convs:
        key = c["conversations"][0]["value"]
        if len(c["conversations"]) >= 4 and key not in seen:
            seen.add(key)
            multi.append(c)
    return pa.concat_tables(
        [canonical_table(alpaca, "alpaca"), canonical_table(multi[:N_CONV], "conv")]
    )


@pytest.fixture(scope="module")
def vllm_scorer(load_tiny):
    backend = load_tiny("vllm", "score", MAX_LEN)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf_scorer(load_tiny):
    return load_tiny("hf", "score", MAX_LEN)


@pytest.fixture(scope="module")
def digit_ids(hf_scorer):
    return resolve_digit_ids(hf_scorer.tokenizer)


@pytest.fixture(scope="module")
def vllm_scored(pool, vllm_scorer, digit_ids) -> pa.Table:
    return score_table(pool, vllm_scorer, digit_ids)


@pytest.fixture(scope="module")
def hf_scored(pool, hf_scorer, digit_ids) -> pa.Table:
    return score_table(pool, hf_scorer, digit_ids)


def flat(table: pa.Table, col: str) -> np.ndarray:
    return np.array([v for row in table[col].to_pylist() for v in row], dtype=np.float64)


# ------------------------------------------------------------------ pure helpers


def test_expected_score_formula():
    z = np.array([[0.0] * 6, [100.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 100.0], [1, 2, 3, 4, 5, 6]])
    s = expected_score(z)
    p = np.exp([1, 2, 3, 4, 5, 6]) / np.exp([1, 2, 3, 4, 5, 6]).sum()
    np.testing.assert_allclose(s, [3.5, 1.0, 6.0, (p * np.arange(1, 7)).sum()], atol=1e-12)
    # log-probabilities and logits give the same score (shift invariance)
    np.testing.assert_allclose(expected_score(z - 7.0), s, atol=1e-12)
    with pytest.raises(ValueError):
        expected_score(np.zeros((2, 5)))


def test_digit_ids_from_tokenizer_and_override(hf_scorer):
    tok = hf_scorer.tokenizer
    ids = resolve_digit_ids(tok)
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5", "6"]
    assert resolve_digit_ids(tok, list(reversed(ids))) == list(reversed(ids))
    with pytest.raises(DigitTokenError):
        resolve_digit_ids(tok, ids[:5])
    with pytest.raises(DigitTokenError):
        resolve_digit_ids(tok, [*ids[:5], 10**7])


def test_digit_not_single_token_fails(tmp_path):
    """A tokenizer without a "4" token (it encodes "4" as unknown) fails at start."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁": 1, "1": 2, "2": 3, "3": 4, "5": 5, "6": 6, "▁7": 7}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    with pytest.raises(DigitTokenError, match="'4'"):
        resolve_digit_ids(tok)


def test_water_fill():
    assert water_fill([10, 100], 50) == [10, 40]
    assert water_fill([100, 100], 51) == [26, 25]
    assert water_fill([3, 4], 100) == [3, 4]
    assert sum(water_fill([7, 9, 200], 60)) == 60


def test_fit_prompt_truncates_inside_fields(hf_scorer):
    tok = hf_scorer.tokenizer
    long_text = "The quick brown fox jumps over the lazy dog. " * 400
    ids, cut = fit_prompt(tok, complexity_spec(long_text), 200)
    assert cut and len(ids) <= 200
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.startswith(COMPLEXITY_PIECES[0]) and text.endswith(COMPLEXITY_PIECES[1])
    assert long_text.startswith(text[len(COMPLEXITY_PIECES[0]) : -len(COMPLEXITY_PIECES[1])])
    # both fields of a quality prompt are cut, the template kept whole
    ids, cut = fit_prompt(tok, quality_spec("short question", long_text), 150)
    text = tok.decode(ids, skip_special_tokens=True)
    assert cut and len(ids) <= 150 and "short question" in text
    assert text.endswith(QUALITY_PIECES[2]) and QUALITY_PIECES[1] in text
    # fits: untouched
    ids, cut = fit_prompt(tok, complexity_spec("hi"), 200)
    assert not cut and ids == tok(complexity_prompt("hi"))["input_ids"]
    with pytest.raises(PromptTooLong):
        fit_prompt(tok, complexity_spec(long_text), 10)


# ------------------------------------------------------------------ backends agree


def test_vllm_and_hf_agree_on_every_score(vllm_scored, hf_scored, pool):
    for table in (vllm_scored, hf_scored):
        assert table["_reject_reason"].null_count == pool.num_rows  # nothing rejected
    for col in ("complexity_scores", "quality_scores"):
        v, h = flat(vllm_scored, col), flat(hf_scored, col)
        assert len(v) == len(h) > N_ALPACA
        assert np.max(np.abs(v - h)) <= 1e-4, col
        assert np.all((v >= 1) & (v <= 6))
        assert np.std(v) > 1e-3  # the scores really differ between prompts
    np.testing.assert_allclose(
        vllm_scored["evol_score"].to_numpy(), hf_scored["evol_score"].to_numpy(), atol=1e-3
    )


def test_multi_turn_one_score_per_turn_and_evol(vllm_scored, pool):
    messages = pool["messages"].to_pylist()
    cs = vllm_scored["complexity_scores"].to_pylist()
    qs = vllm_scored["quality_scores"].to_pylist()
    evol = vllm_scored["evol_score"].to_pylist()
    n_multi = 0
    for m, c, q, e in zip(messages, cs, qs, evol, strict=True):
        n = len(extract_turns(m))
        assert len(c) == len(q) == n
        n_multi += n > 1
        assert e == pytest.approx(sum(a * b for a, b in zip(c, q, strict=True)), abs=1e-12)
    assert n_multi >= 20


def test_truncated_flag_marks_exactly_the_long_rows(vllm_scored, vllm_scorer, pool):
    from deita_ray.templates import quality_prompt

    tok = vllm_scorer.tokenizer
    want = []
    for m in pool["messages"].to_pylist():
        prompts = [
            p for u, r in extract_turns(m) for p in (complexity_prompt(u), quality_prompt(u, r))
        ]
        want.append(max(len(tok(p)["input_ids"]) for p in prompts) > MAX_LEN - 1)
    assert vllm_scored["truncated"].to_pylist() == want
    assert 0 < sum(want) < len(want)


def test_scores_equal_formula_by_hand(pool, vllm_scored, hf_scored, tiny_llama, digit_ids):
    """A plain transformers forward, softmax over the six digit logits, sum k * p_k."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rows = [0, 1, 2, N_ALPACA, N_ALPACA + 1]  # alpaca and multi-turn rows
    for i in rows:
        turns = extract_turns(pool["messages"][i].as_py())
        for t, (instruction, response) in enumerate(turns):
            for col, prompt in (
                ("complexity_scores", complexity_prompt(instruction)),
                ("quality_scores", None),
            ):
                if prompt is None:
                    from deita_ray.templates import quality_prompt

                    prompt = quality_prompt(instruction, response)
                ids = tok(prompt, return_tensors="pt")["input_ids"]
                assert ids[0, 0].item() == tok.bos_token_id
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0, -1, digit_ids].double()
                p = torch.softmax(logits, dim=0)
                by_hand = float((p * torch.arange(1, 7, dtype=torch.float64)).sum())
                for table in (vllm_scored, hf_scored):
                    assert table[col][i].as_py()[t] == pytest.approx(by_hand, abs=1e-4)


def test_scores_independent_of_batch_size_and_batchmates(
    pool, vllm_scored, vllm_scorer, hf_scorer, digit_ids
):
    rng = np.random.default_rng(0)
    idx = rng.permutation(pool.num_rows)[:24]
    sub = pool.take(pa.array(idx))
    want = {
        c: [vllm_scored[c][int(i)].as_py() for i in idx]
        for c in ("complexity_scores", "quality_scores")
    }
    for backend in (vllm_scorer, hf_scorer):
        for bs in (1, 5, 24):
            parts = [
                score_table(sub.slice(s, bs), backend, digit_ids)
                for s in range(0, sub.num_rows, bs)
            ]
            got = pa.concat_tables(parts)
            for c, rows in want.items():
                g = np.array([v for r in got[c].to_pylist() for v in r])
                w = np.array([v for r in rows for v in r])
                assert np.max(np.abs(g - w)) <= (1e-5 if backend is vllm_scorer else 1e-4)


# ------------------------------------------------------------------ truncation, rejects


def _rows(messages_list: list[list[dict]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "id": f"x{k}",
                "seq": k,
                "messages": m,
                "source": "t",
                "format": "messages",
                "extra": "{}",
            }
            for k, m in enumerate(messages_list)
        ],
        schema=CANONICAL_SCHEMA,
    )


def test_long_prompts_truncated_and_flagged(vllm_scorer, hf_scorer, digit_ids):
    long = "Explain photosynthesis in plants. " * 300
    table = _rows(
        [
            [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}],
            [{"role": "user", "content": "short"}, {"role": "assistant", "content": long}],
            [{"role": "user", "content": "short"}, {"role": "assistant", "content": "fine"}],
        ]
    )
    outs = [score_table(table, b, digit_ids) for b in (vllm_scorer, hf_scorer)]
    for out in outs:
        assert out["truncated"].to_pylist() == [True, True, False]
        assert out["_reject_reason"].null_count == 3
    np.testing.assert_allclose(
        flat(outs[0], "quality_scores"), flat(outs[1], "quality_scores"), atol=1e-4
    )


def test_unscorable_rows_rejected_rest_scored(load_tiny, vllm_scored, pool, digit_ids):
    # a context so small that the quality template alone does not fit (complexity does)
    tight = load_tiny("hf", "score", max_len=40)
    n_template = len(tight.tokenizer(quality_spec("", "").text)["input_ids"])
    assert n_template > 39
    table = pa.concat_tables(
        [
            pool.slice(0, 2),
            _rows([[{"role": "assistant", "content": "no user here"}], [], None]),
        ]
    )
    out = score_table(table, tight, digit_ids)
    assert out["_reject_reason"].to_pylist() == ["prompt_too_long"] * 2 + [
        "no_turns",
        "no_turns",
        "missing_messages",
    ]
    assert out["complexity_scores"].null_count == 5 and out["evol_score"].null_count == 5
    raw = json.loads(out["_raw"][2].as_py())
    assert raw["id"] == "x0" and raw["messages"][0]["content"] == "no user here"
    # with room for the template, the two good rows score as before while the bad ones reject
    ok_backend = load_tiny("hf", "score", MAX_LEN)
    out = score_table(table, ok_backend, digit_ids)
    assert out["_reject_reason"].to_pylist()[:2] == [None, None]
    for c in ("complexity_scores", "quality_scores"):
        for i in range(2):
            np.testing.assert_allclose(out[c][i].as_py(), vllm_scored[c][i].as_py(), atol=1e-4)


def test_engine_error_isolated_to_its_prompt(vllm_scorer, hf_scorer, digit_ids):
    """A prompt the engine refuses (token id outside the vocabulary) fails alone."""
    tok = vllm_scorer.tokenizer
    good = [tok(complexity_prompt(f"question {k}"))["input_ids"] for k in range(5)]
    bad = [good[0][0], 10**6, good[0][1]]
    for backend in (vllm_scorer, hf_scorer):
        alone, _ = backend.digit_logits(good, digit_ids)
        vals, errors = backend.digit_logits([good[0], good[1], bad, *good[2:]], digit_ids)
        assert [e is None for e in errors] == [True, True, False, True, True, True]
        assert np.all(np.isnan(vals[2]))
        np.testing.assert_allclose(
            expected_score(vals[[0, 1, 3, 4, 5]]), expected_score(alone), atol=1e-5
        )


# ------------------------------------------------------------------ the Ray stage


def _write_ingest(out_dir: Path, table: pa.Table, n_files: int) -> None:
    folder = out_dir / "ingest"
    folder.mkdir(parents=True)
    step = -(-table.num_rows // n_files)
    for k in range(n_files):
        pq.write_table(table.slice(k * step, step), folder / f"part-{k:05d}.parquet")


def _stage_cfg(
    tiny_model_cfg, complexity_backend: str = "vllm", quality_backend: str = "vllm"
) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.score.complexity_model = tiny_model_cfg(complexity_backend, MAX_LEN)
    cfg.score.quality_model = tiny_model_cfg(quality_backend, MAX_LEN)
    cfg.score.resources = ActorPoolConfig(concurrency=1, num_cpus=0.5, batch_size=16)
    return cfg


def _read(folder: Path) -> dict[str, dict]:
    t = pds.dataset(str(folder), format="parquet").to_table()
    return {r["id"]: r for r in t.to_pylist()}


def _stage_input(pool: pa.Table) -> pa.Table:
    sub = pool.take(pa.array(list(range(0, 40)) + list(range(N_ALPACA, N_ALPACA + 10))))
    bad = _rows([[{"role": "assistant", "content": "nothing to score"}]])
    bad = bad.set_column(0, "id", pa.array(["bad:0"])).set_column(1, "seq", pa.array([999]))
    return pa.concat_tables([sub, bad])


def _check_stage_output(out_dir: Path, result, vllm_scored, pool, atol: float) -> None:
    assert result.counts.rows_in == 51
    assert result.counts.rows_out == 50 and result.counts.rejected_by_reason == {"no_turns": 1}
    got = _read(out_dir / "score")
    assert set(got) == {
        pool["id"][i].as_py() for i in list(range(40)) + list(range(N_ALPACA, N_ALPACA + 10))
    }
    want = {r["id"]: r for r in vllm_scored.to_pylist()}
    for rid, row in got.items():
        for c in ("complexity_scores", "quality_scores"):
            np.testing.assert_allclose(row[c], want[rid][c], atol=atol)
        assert row["evol_score"] == pytest.approx(want[rid]["evol_score"], abs=50 * atol)
        assert row["messages"] == want[rid]["messages"] and row["source"] == want[rid]["source"]
    rejects = pds.dataset(str(out_dir / "rejects" / "score"), format="parquet").to_table()
    assert rejects["reason"].to_pylist() == ["no_turns"] and rejects["id"].to_pylist() == ["bad:0"]
    assert result.metrics["evol_score"]["mean"] > 0 and result.metrics["rows"] == 50


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_run_score_survives_a_killed_scorer_actor(
    ray_local, tiny_model_cfg, tmp_path, pool, vllm_scored, backend
):
    """One pool for both prompt kinds; its actor is SIGKILLed once it is up: Ray restarts it,
    retries its batches, and the output is complete and equal to the in-process scores.
    (The vLLM variant restarts a whole engine, hence slow; the hf one runs in the fast suite.)"""
    import signal

    import ray

    from deita_ray.stages.score import run_score

    def scorer_actors() -> list[dict]:
        # GCS actor table of this driver's job (no dashboard needed); Ray Data actors are
        # instances of its map worker class.
        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        table = ray._private.state.actors(job_id=job)
        return [a for a in table.values() if "MapWorker" in a["ActorClassName"]]

    before = {a["ActorID"] for a in scorer_actors()}
    _write_ingest(tmp_path, _stage_input(pool), n_files=6)
    cfg = _stage_cfg(tiny_model_cfg, complexity_backend=backend, quality_backend=backend)
    box: dict = {}

    def target():
        try:
            box["result"] = run_score(cfg, str(tmp_path))
        except BaseException as e:  # surfaced below
            box["error"] = e

    th = threading.Thread(target=target)
    th.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and th.is_alive() and time.time() < deadline:
        for a in scorer_actors():
            if a["ActorID"] not in before and a["State"] == "ALIVE" and a["Pid"]:
                os.kill(a["Pid"], signal.SIGKILL)  # the scorer actor this test's stage started
                killed = a
                break
        time.sleep(0.2)
    th.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert killed is not None, "the scorer actor was never seen alive"
    after = ray._private.state.actors(actor_id=killed["ActorID"])
    assert after["NumRestarts"] >= 1
    atol = 1e-5 if backend == "vllm" else 1e-4
    _check_stage_output(tmp_path, box["result"], vllm_scored, pool, atol=atol)


def test_run_score_two_scorer_models(ray_local, tiny_model_cfg, tmp_path, pool, vllm_scored):
    """Different complexity / quality configs: two actor pools, scores chained per row
    (transformers pools here: cheap to start, and they must match the vLLM scores)."""
    from deita_ray.stages.score import run_score

    _write_ingest(tmp_path, _stage_input(pool), n_files=2)
    cfg = _stage_cfg(tiny_model_cfg, complexity_backend="hf", quality_backend="hf")
    cfg.score.quality_model.hf_batch_size = 8  # a different config: a second pool
    result = run_score(cfg, str(tmp_path))
    assert set(result.metrics["models"]) == {"complexity", "quality"}
    _check_stage_output(tmp_path, result, vllm_scored, pool, atol=1e-4)


# ------------------------------------------------------------------ scorer registry, the stage


def _demo_ingest(ray_local, out_dir: Path) -> pa.Table:
    """The quickstart's demo pool through the real ingest stage; its rows in seq order."""
    from deita_ray.config import load_config
    from deita_ray.stages.ingest import run_ingest

    run_ingest(load_config(data={"demo_pool": True}), str(out_dir))
    return pds.dataset(str(out_dir / "ingest"), format="parquet").to_table().sort_by("seq")


def deita_reference(rows: pa.Table, backend, digit_ids: list[int]) -> pa.Table:
    """The default scorers' columns computed here from the untouched formula: per row, the
    complexity prompts of its turns then the quality prompts (docs/scoring.md templates, BOS as normal
    encoding, truncation inside the text fields), the six digit logits, the expected digit,
    evol = sum of products. Rows that cannot be scored are left out."""
    from deita_ray.templates import quality_prompt

    tok, budget = backend.tokenizer, backend.max_prompt_tokens
    keep, prompts, flags, where = [], [], [], []
    for i, messages in enumerate(rows["messages"].to_pylist()):
        turns = extract_turns(messages)
        specs = [complexity_spec(u) for u, _ in turns] + [quality_spec(u, r) for u, r in turns]
        assert [s.text for s in specs[len(turns) :]] == [quality_prompt(u, r) for u, r in turns]
        try:
            fitted = [fit_prompt(tok, s, budget) for s in specs]
        except PromptTooLong:
            continue
        if not turns:
            continue
        keep.append(i)
        where.append((len(prompts), len(turns)))
        prompts += [ids for ids, _ in fitted]
        flags.append(any(cut for _, cut in fitted))
    values, errors = backend.digit_logits(prompts, digit_ids)
    assert not any(errors)
    scores = expected_score(values).tolist()
    comp, qual, evol = [], [], []
    for start, n in where:
        c, q = scores[start : start + n], scores[start + n : start + 2 * n]
        comp.append(c)
        qual.append(q)
        evol.append(math.fsum(a * b for a, b in zip(c, q, strict=True)))
    out = rows.take(pa.array(keep))
    out = out.append_column("complexity_scores", pa.array(comp, pa.list_(pa.float64())))
    out = out.append_column("quality_scores", pa.array(qual, pa.list_(pa.float64())))
    out = out.append_column("evol_score", pa.array(evol, pa.float64()))
    return out.append_column("truncated", pa.array(flags, pa.bool_()))


def _default_scorers_identical(
    ray_local, tmp_path: Path, model_cfg, rows_kept: int | None = None
) -> None:
    from deita_ray.models.backend import load_backend
    from deita_ray.stages.score import run_score

    rows = _demo_ingest(ray_local, tmp_path)
    if rows_kept is not None:  # every record shape is among the demo pool's first rows
        rows = rows.slice(0, rows_kept)
        shutil.rmtree(tmp_path / "ingest")
        (tmp_path / "ingest").mkdir()
        pq.write_table(rows, tmp_path / "ingest" / "part-00000.parquet")
    cfg = PipelineConfig()
    cfg.score.complexity_model = cfg.score.quality_model = model_cfg
    cfg.score.resources = ActorPoolConfig(concurrency=1, num_cpus=1, batch_size=64)
    result = run_score(cfg, str(tmp_path))
    written = pds.dataset(str(tmp_path / "score"), format="parquet").to_table().sort_by("seq")
    backend = load_backend(model_cfg, model_cfg.path, "score")
    want = deita_reference(rows, backend, resolve_digit_ids(backend.tokenizer))
    backend.close()
    assert written.schema.names == want.schema.names  # no column added, none moved
    assert written.schema.equals(want.schema)
    for name in written.schema.names:
        assert written[name].to_pylist() == want[name].to_pylist(), name
    assert result.counts.rows_out == want.num_rows
    assert any(want["truncated"].to_pylist())  # the truncation path is part of the comparison
    assert set(result.metrics["throughput"]["kinds"]) == {"deita_complexity", "deita_quality"}


def test_default_scorers_byte_identical_on_the_demo_pool(ray_local, tiny_model_cfg, tmp_path):
    """The registry's default (the DEITA pair) writes exactly the columns and values of the
    formula on the quickstart's demo pool (one prompt per hf forward: bit-reproducible)."""
    cfg = tiny_model_cfg("hf", 256)  # short: some demo rows are truncated
    cfg.hf_batch_size = 1
    _default_scorers_identical(ray_local, tmp_path, cfg)


@pytest.mark.slow
def test_default_scorers_byte_identical_on_the_demo_pool_smollm2(ray_local, smollm2_path, tmp_path):
    from deita_ray.config import ModelConfig

    # 64 tokens: SmolLM2's BPE fits every demo prompt in 128, and the truncation path must run
    # (on a real tokenizer: cuts inside the text fields, never inside the template). The first
    # 24 demo rows hold alpaca, dolly, messages and multi-turn sharegpt records, cut and uncut
    # (the tiny-model test above covers every row).
    cfg = ModelConfig(
        path=smollm2_path, backend="hf", dtype="float32", max_model_len=64, hf_batch_size=1
    )
    _default_scorers_identical(ray_local, tmp_path, cfg, rows_kept=24)


def _new_map_workers(before: set) -> list[dict]:
    import ray

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    table = ray._private.state.actors(job_id=job)
    return [
        a
        for a in table.values()
        if "MapWorker" in a["ActorClassName"] and a["ActorID"] not in before
    ]


def test_run_score_shares_one_model_pool_and_runs_length_as_tasks(
    ray_local, tiny_model_cfg, tmp_path, pool
):
    """The DEITA pair and perplexity on one model: one actor pool (one engine); the length
    scorer never starts a model actor; per-kind throughput lands in the metrics."""
    import dataclasses

    from deita_ray.config import ScorerConfig
    from deita_ray.stages.score import run_score

    table = _stage_input(pool)
    model = tiny_model_cfg("hf", MAX_LEN)
    for name, kinds in (
        ("mixed", ["deita_complexity", "deita_quality", "perplexity"]),
        ("length", []),
    ):
        out = tmp_path / name
        _write_ingest(out, table, n_files=2)
        cfg = _stage_cfg(tiny_model_cfg, "hf", "hf")
        cfg.score.scorers = [ScorerConfig(kind=k, model=model) for k in kinds] + [
            ScorerConfig(kind="length", model=dataclasses.replace(model))
        ]
        before = {a["ActorID"] for a in _new_map_workers(set())}
        result = run_score(cfg, str(out))
        workers = _new_map_workers(before)
        got = _read(out / "score")
        assert result.counts.rows_out == 50
        kinds_seen = set(result.metrics["throughput"]["kinds"])
        assert kinds_seen == {*kinds, "length"}
        length = result.metrics["throughput"]["kinds"]["length"]
        assert length["rows"] == 50 and length["rows_per_s"] > 0  # rows with a turn
        some = next(iter(got.values()))
        assert some["response_tokens"] > 0 and some["instruction_chars"] > 0
        if name == "mixed":
            assert len(workers) == 1, workers  # one engine for three scorers
            assert list(result.metrics["models"]) == ["complexity+quality+ppl"]
            assert all(r["ppl"] > 1 and r["evol_score"] > 0 for r in got.values())
            ppl = result.metrics["throughput"]["kinds"]["perplexity"]
            assert ppl["tokens"] > 0 and ppl["tokens_per_s"] > 0
            assert "ppl" in result.metrics["columns"]
        else:
            assert workers == []  # no model actor for a scorer without a model
            assert result.metrics["models"] == {}
            assert all(r["evol_score"] is None for r in got.values())

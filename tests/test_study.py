"""The study job: arms over shared stages, a failing arm, runs per training seed, adding an arm
and a seed (the statistics themselves: tests/test_study_statistics.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from deita_ray.config import ConfigError, load_config
from deita_ray.study import arm_row_scores, expand_arms


def _model(path: Path) -> dict:
    return {
        "path": str(path),
        "backend": "hf",
        "dtype": "float32",
        "max_model_len": 512,
        "hf_batch_size": 16,
    }


def _study(tiny: Path, pool: Path, evalset: Path, out: Path, arms: list[dict]) -> dict:
    res = {"concurrency": 1, "num_cpus": 1, "batch_size": 32}
    return {
        "stages": ["ingest", "score", "embed", "select", "sft", "eval"],
        "input": {"paths": [str(pool)]},
        "output": {"dir": str(out)},
        "score": {
            "complexity_model": _model(tiny),
            "quality_model": _model(tiny),
            "resources": res,
        },
        "embed": {"model": _model(tiny), "max_length": 128, "resources": res},
        "select": {"budget": 8, "tau": 0.999, "block_size": 8},
        "sft": {
            "template": "vicuna_v1.1",
            "epochs": 1,
            "max_steps": 1,
            # One step that moves the model (with warmup its learning rate would be 0, and
            # every trained model would equal the base model).
            "warmup_ratio": 0.0,
            "learning_rate": 1.0e-3,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "max_length": 384,
            "precision": "fp32",
            "zero_stage": 2,
        },
        "eval": {
            "model": {**_model(tiny), "path": ""},
            "template": "vicuna_v1.1",
            "sets": [{"name": "held_out", "paths": [str(evalset)]}],
            "resources": res,
        },
        "study": {"arms": arms},
    }


def test_config_errors_name_the_key(tmp_path):
    base = {"stages": ["ingest", "eval"], "input": {"paths": ["x"]}}
    with pytest.raises(ConfigError, match=r"study.arms\[0\] allows: method, name, taus, seeds"):
        load_config(data={**base, "study": {"arms": [{"metod": "random"}]}})
    with pytest.raises(ConfigError, match="study.arms.0..method: 'best' is not allowed"):
        load_config(data={**base, "study": {"arms": [{"method": "best"}]}})
    sets = {"sets": [{"name": "a", "paths": ["x"]}]}
    cfg = load_config(
        data={**base, "eval": sets, "study": {"arms": [{"method": "random"}, {"method": "random"}]}}
    )
    with pytest.raises(ConfigError, match="two arms are named 'random_s0'"):
        expand_arms(cfg)
    trained = {**base, "stages": ["ingest", "select", "sft", "eval"], "eval": sets}
    lazy = {**trained, "select": {"lazy_embed": True}, "study": {"arms": [{"method": "deita"}]}}
    with pytest.raises(ConfigError, match="select.lazy_embed: not supported by the study"):
        expand_arms(load_config(data=lazy))
    cfg = load_config(data={**trained, "study": {"arms": [{"method": "kcenter"}]}})
    with pytest.raises(ConfigError, match="needs the stages embed"):
        expand_arms(cfg)
    cfg = load_config(
        data={
            **base,
            "stages": ["ingest", "score", "embed", "select", "sft", "eval"],
            "select": {"budget": 200},
            "eval": sets,
            "study": {"arms": [{"method": "deita", "taus": [0.9, 0.95]}, {"method": "base"}]},
        }
    )
    assert [a.name for a in expand_arms(cfg)] == ["deita_tau0.9", "deita_tau0.95", "base"]


def test_the_summary_written_after_the_first_arm_has_no_empty_plot(tmp_path):
    """After every arm the study rewrites its summary; when only the untrained base arm has
        finished, no arm has selection statistics yet: the table says so and the selection plot is
    left out."""
    from deita_ray.study import summarize, write_outputs

    arms_cfg = [{"method": "base"}, {"method": "random", "seeds": [0, 1]}]
    cfg = load_config(data=_study(tmp_path, tmp_path, tmp_path, tmp_path / "s", arms_cfg))
    out = tmp_path / "s"
    out.mkdir()
    study = summarize(cfg, str(out), expand_arms(cfg), {"base": {"status": "done"}}, {}, {})
    write_outputs(str(out), study)
    assert not (out / "plots/study_selection.png").exists()
    saved = json.loads((out / "study.json").read_text())
    assert saved["arms"]["random_s0"]["status"] == "not_run"
    assert saved["arms"]["random_s0"]["selection"] is None  # not "0 selected": not run yet
    assert "random_s1" in (out / "study.md").read_text()


def test_an_arm_finished_by_an_earlier_run_keeps_its_wall_time(tmp_path):
    """A resumed study skips finished arms in about a second; the table's `wall s` is still the
    time the arm's own stages took when they ran (the shared stages it links are not counted),
    and this run's time is kept apart."""
    from deita_ray.study import ARMS_DIR, summarize, write_outputs

    cfg = load_config(
        data=_study(tmp_path, tmp_path, tmp_path, tmp_path / "s", [{"method": "base"}])
    )
    out = tmp_path / "s"
    arm_dir = out / ARMS_DIR / "base"
    arm_dir.mkdir(parents=True)
    stages = {"ingest": 3.0, "score": 1097.0, "embed": 599.0, "eval": 41.5}
    report = {"stages": {k: {"seconds": v} for k, v in stages.items()}}
    (arm_dir / "report.json").write_text(json.dumps(report))
    results = {"base": {"status": "done", "seconds": 1.2}}
    timing = {"shared_s": 0.5, "arms_s": 1.3, "total_s": 1.9}
    study = summarize(cfg, str(out), expand_arms(cfg), results, {}, timing)
    write_outputs(str(out), study)
    seconds = study["arms"]["base"]["seconds"]
    assert (seconds["wall"], seconds["this_run"], seconds["score"]) == (41.5, 1.2, 1097.0)
    assert study["seconds"]["arms_stages_s"] == 41.5 and study["seconds"]["total_s"] == 1.9
    row = next(line for line in (out / "study.md").read_text().splitlines() if "| base |" in line)
    assert row.endswith("| 42 |")  # 41.5 s, not this run's 1 s


def test_row_score_rule():
    t = pa.table(
        {
            "complexity_scores": pa.array([[1.0, 2.0], [3.0], None], pa.list_(pa.float64())),
            "quality_scores": pa.array([[4.0, 1.0], [2.0], None], pa.list_(pa.float64())),
        }
    )
    assert arm_row_scores("complexity", t).to_pylist() == [3.0, 3.0, None]
    assert arm_row_scores("quality", t).to_pylist() == [5.0, 2.0, None]
    assert arm_row_scores("diversity", t).to_pylist() == [0.0, 0.0, 0.0]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # nine runs and a re-run, each starting Ray Train on 2 cores
def test_small_study_end_to_end(ray_local, tiny_llama, shared_data, tmp_path):
    """Two random draws, the base model, and an arm whose training fails (its selection has no
    assistant token left within sft.max_length), at one training seed: the others complete and
    the statistics say what they rest on. Then one more arm (quality-only, on a derived score
    folder) and a second training seed are added: only the new runs run, and the paired
    statistics rest on 2 draws x 2 seeds."""
    from deita_ray.study import run_study

    records = json.loads((shared_data / "alpaca/alpaca_data.json").read_text())
    pool = records[:36] + [
        {"instruction": "Summarise this text: " + "word " * 400, "input": "", "output": "Ok."}
        for _ in range(8)
    ]
    pool_file = tmp_path / "pool.json"
    pool_file.write_text(json.dumps(pool))
    eval_file = tmp_path / "held_out.json"
    eval_file.write_text(json.dumps(records[100:106]))
    out = tmp_path / "study"
    arms = [
        {"method": "random", "seeds": [0, 1]},
        {"method": "base"},
        {"method": "instruction_length", "name": "too_long"},
    ]
    cfg = load_config(data=_study(tiny_llama, pool_file, eval_file, out, arms))
    study = run_study(cfg)
    a = study["arms"]
    assert a["too_long"]["status"] == "failed"
    assert "no trainable rows" in a["too_long"]["error"]
    for name in ("random_s0", "random_s1", "base"):
        assert a[name]["status"] == "done", a[name]
        lk = a[name]["eval"]["held_out"]["likelihood"]
        assert lk["rows"] == 6 and lk["ci95"][0] <= lk["value"] <= lk["ci95"][1]
        assert (out / a[name]["eval_rows"]["held_out"]).is_dir()
    assert a["random_s0"]["train_seed"] == 42 and a["base"]["train_seed"] is None
    assert a["base"]["training"] is None and a["base"]["selection"] is None
    assert a["random_s0"]["training"]["steps"] == 1
    s0, s1 = a["random_s0"]["selection"], a["random_s1"]["selection"]
    assert s0["selected"] == 8 and s0["overlap"]["random_s1"] == s1["overlap"]["random_s0"]
    assert s0["mean_response_chars"] > 0 and s0["mean_evol_score"] is not None
    cmp = study["comparisons"]["held_out"]["likelihood"]
    assert (cmp["rows"], cmp["random"]["draws"], cmp["random"]["seeds"]) == (6, 2, 1)
    assert cmp["variance"]["seed_assumed"]  # one training seed: assumed, and said so
    assert cmp["verdicts"]["too_long"] == "inconclusive"
    assert "no finished run" in cmp["arms"]["too_long"]["reason"]
    assert cmp["arms"]["too_long"]["runs_left_out"]["too_long"].startswith("failed: ")
    values = [a[n]["eval"]["held_out"]["likelihood"]["value"] for n in ("random_s0", "random_s1")]
    assert cmp["random"]["nll_token_mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert cmp["base"]["delta"] == pytest.approx(
        a["base"]["eval"]["held_out"]["likelihood"]["value"] - np.mean(values), abs=1e-9
    )
    assert study["primary"] is None  # no deita arm
    assert study["seconds"]["shared_stages"]["score"] > 0
    table = (out / "study.md").read_text()
    assert "## held_out" in table and "| random_s0 |" in table and "too_long" in table
    assert "every comparison is exploratory" in table
    assert (out / "plots/study_selection.png").stat().st_size > 0
    assert (out / "arms/random_s0/score").is_symlink()

    # Add an arm and a training seed: only the new runs run; the finished ones keep their
    # manifests (the run at sft.seed keeps its folder and its hashes).
    def finished(name: str) -> dict:
        m = json.loads((out / "arms" / name / "manifest.json").read_text())
        return {s: e.get("finished_at") for s, e in m["stages"].items()}

    before = {n: finished(n) for n in ("random_s0", "random_s1", "base")}
    data2 = _study(tiny_llama, pool_file, eval_file, out, [*arms, {"method": "quality"}])
    data2["study"]["train_seeds"] = [42, 43]
    study2 = run_study(load_config(data=data2))
    assert {n: finished(n) for n in before} == before
    a2 = study2["arms"]
    for name in ("quality", "quality_t43", "random_s0_t43", "random_s1_t43"):
        assert a2[name]["status"] == "done", a2[name]
    assert a2["random_s1_t43"]["train_seed"] == 43 and a2["too_long_t43"]["status"] == "failed"
    assert "base_t43" not in a2  # the untrained model has no training seed
    derived = out / "arms/quality/score"
    assert derived.is_dir() and not derived.is_symlink()
    cmp2 = study2["comparisons"]["held_out"]["likelihood"]
    assert (cmp2["random"]["draws"], cmp2["random"]["seeds"]) == (2, 2)
    assert not cmp2["variance"]["seed_assumed"]
    q = cmp2["arms"]["quality"]
    assert q["runs"] == ["quality", "quality_t43"] and q["verdict"] in (
        "better",
        "worse",
        "equivalent",
        "inconclusive",
    )
    assert q["se"] > 0 and q["ci"][0] <= q["delta"] <= q["ci"][1] and q["mde"] > 0
    assert a2["quality"]["eval"]["held_out"]["likelihood"]["value"] != pytest.approx(
        a2["base"]["eval"]["held_out"]["likelihood"]["value"], abs=1e-9
    )  # trained: the model moved
    # The quality arm took the rows with the largest summed quality (the random tiny scorer
    # rates the long rows low on quality, so this arm trains; it ranks them high on complexity).
    import pyarrow.parquet as pq

    scores = pq.read_table(out / "score").to_pydict()
    sums = {i: sum(q or []) for i, q in zip(scores["id"], scores["quality_scores"], strict=True)}
    picked = pq.read_table(out / "arms/quality/select")["id"].to_pylist()
    top = sorted(sums.values(), reverse=True)[:8]
    assert sorted((sums[i] for i in picked), reverse=True) == pytest.approx(top)
    assert np.isfinite(a2["quality"]["eval"]["held_out"]["likelihood"]["value"])

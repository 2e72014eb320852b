"""The study's statistics (deita_ray.evaluation, pure numpy) on simulated studies with a known
effect and known noise, and the study summary built from per-row files (no Ray, no model).

A simulated study has eval rows of varying length and difficulty, random draws whose selection
shifts the NLL (draw noise), training runs that shift it again (seed noise, plus a shift every
selection shares at a seed), arm x prompt interactions and token-level noise; every number is
drawn from a fixed seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray.config import ConfigError, load_config
from deita_ray.evaluation import (
    design_mde,
    design_se,
    holm,
    length_adjusted,
    paired_comparison,
    style_effects,
    t_ppf,
    t_sf,
)

# ---------------------------------------------------------------------------------------------
# A simulated study

NOISE = {
    "sd_draw": 0.01,  # a random draw's selection effect (NLL/token)
    "sd_seed": 0.008,  # a training run about its selection's mean
    "sd_shared": 0.005,  # what a training seed shifts for every selection
    "sd_gamma": 0.02,  # selection x prompt interaction
    "sd_tok": 0.5,  # per-token noise (a row's mean: sd_tok / sqrt(tokens))
}
TOKENS = (30, 600)  # answer tokens per row: uniform integers in [30, 600)


def simulate(rng, effects, n=200, draws=5, seeds=2, **noise):
    """``(arms, random, tokens, base)`` of one study: arm j's true Delta is ``effects[j]``."""
    sd = {**NOISE, **noise}
    tok = rng.integers(*TOKENS, n).astype(float)
    mu = rng.normal(2.0, 0.3, n)
    shared = rng.normal(0, sd["sd_shared"], seeds)

    def runs(theta):
        gamma = rng.normal(0, sd["sd_gamma"], n)
        eps = rng.normal(0, sd["sd_seed"], seeds)
        e = rng.normal(0, sd["sd_tok"], (seeds, n)) / np.sqrt(tok)
        return (mu + theta + gamma + shared[:, None] + eps[:, None] + e) * tok

    rnd = np.stack([runs(rng.normal(0, sd["sd_draw"])) for _ in range(draws)])
    arms = {f"arm{j}": runs(e) for j, e in enumerate(effects)}
    base = (mu + 0.06 + rng.normal(0, sd["sd_gamma"], n)) * tok
    return arms, rnd, tok, base


def true_mde(n=200, draws=5, seeds=2, family=4, **noise):
    """The design MDE from the simulation's true variance components."""
    sd = {**NOISE, **noise}
    t = np.arange(*TOKENS, dtype=float)
    # Per-row variance of the linearised paired difference: the arm's and the random draws'
    # prompt interactions, and the token noise averaged over seeds.
    row_var = (1 + 1 / draws) * (
        sd["sd_gamma"] ** 2 * (t**2).mean() / t.mean() ** 2 + sd["sd_tok"] ** 2 / (seeds * t.mean())
    )
    return float(
        design_mde(
            row_var,
            sd["sd_draw"] ** 2,
            sd["sd_seed"] ** 2,
            n,
            draws,
            seeds,
            family + draws,
            family=family,
        )
    )


def verdicts(rng, effects, studies=200, **kw):
    """Per study the verdict of every arm, and arm0's reported MDE."""
    out, mdes = [], []
    for s in range(studies):
        arms, rnd, tok, base = simulate(rng, effects, **kw)
        res = paired_comparison(arms, rnd, tok, base, resamples=2000, seed=s)
        out.append([res["arms"][a]["verdict"] for a in arms])
        mdes.append(res["arms"]["arm0"].get("mde", math.nan))
    return out, np.array(mdes)


# ---------------------------------------------------------------------------------------------
# Student's t and Holm


def test_t_quantiles_match_the_tables():
    table = [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 4, 2.7764),
        (0.975, 10, 2.2281),
        (0.975, 30, 2.0423),
        (0.995, 4, 4.6041),
        (0.8, 5, 0.9195),
        (0.8, 1, 1.3764),
        (0.9995, 2, 31.5991),
        (0.025, 4, -2.7764),
        (0.975, math.inf, 1.95996),
    ]
    for p, df, want in table:
        assert float(t_ppf(p, df)) == pytest.approx(want, abs=1e-4), (p, df)
    q = t_ppf(np.array([0.9, 0.99, 0.999999]), np.array([1.5, 7.3, 3.0]))
    assert t_sf(q, np.array([1.5, 7.3, 3.0])) == pytest.approx([0.1, 0.01, 1e-6], rel=1e-8)
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_ppf(1.0, 3)


def test_holm_steps_down_and_its_levels_match_its_rejections():
    h = holm([0.001, 0.04, 0.012, 0.3], 0.05)
    # sorted: 0.001 <= .05/4, 0.012 <= .05/3, 0.04 > .05/2: stop there.
    assert h["rejected"].tolist() == [True, False, True, False]
    assert h["level"].tolist() == pytest.approx([0.0125, 0.025, 0.05 / 3, 0.025])
    assert h["adjusted"].tolist() == pytest.approx([0.004, 0.08, 0.036, 0.3])
    # A hypothesis is rejected exactly when its p-value is within its level.
    p = np.array([0.001, 0.04, 0.012, 0.3])
    assert ((p <= h["level"]) == h["rejected"]).all()


# ---------------------------------------------------------------------------------------------
# Simulated studies: power, family-wise error, equivalence


def test_a_planted_difference_of_two_mde_is_found_better():
    """2 x MDE below random on one arm (three others null): `better` in >= 80% of 200 studies;
    the MDE the studies report is the design's MDE (the plan's formula) within 15%."""
    mde = true_mde()
    got, mdes = verdicts(np.random.default_rng(11), [-2 * mde, 0.0, 0.0, 0.0])
    found = np.mean([v[0] == "better" for v in got])
    assert found >= 0.8, found
    assert np.median(mdes) == pytest.approx(mde, rel=0.15)


def test_an_effect_of_one_mde_is_found_about_as_often_as_the_power_says():
    """The MDE is stated at 80% power: an effect of exactly one MDE is found in 65-95% of 200
    studies (78% measured over 500), not always and not rarely."""
    mde = true_mde()
    got, _ = verdicts(np.random.default_rng(12), [-mde, 0.0, 0.0, 0.0])
    found = np.mean([v[0] == "better" for v in got])
    assert 0.65 <= found <= 0.95, found


def test_with_no_effect_anywhere_some_arm_is_called_in_at_most_five_percent():
    """Four null arms, 200 studies: some arm `better` or `worse` in <= 5% (family-wise; 3.5%
    measured over 2,000 studies)."""
    got, _ = verdicts(np.random.default_rng(13), [0.0, 0.0, 0.0, 0.0])
    called = np.mean([any(x in ("better", "worse") for x in v) for v in got])
    assert called <= 0.05, called


def test_a_tiny_difference_with_small_noise_comes_out_equivalent():
    """Noise a fifth of the default (MDE about 0.006 NLL/token) and a true Delta of a tenth of
    the MDE: `equivalent` (the interval inside ±MDE) in most of 200 studies, the wrong sign
    (`worse`) in hardly any."""
    small = {k: v / 5 for k, v in NOISE.items()}
    mde = true_mde(family=2, **small)
    got, mdes = verdicts(np.random.default_rng(14), [-0.1 * mde, 0.0], **small)
    first = [v[0] for v in got]
    assert first.count("equivalent") / len(first) >= 0.5, first.count("equivalent")
    assert first.count("worse") / len(first) <= 0.025
    assert np.median(mdes) == pytest.approx(mde, rel=0.15) and mde < 0.01


# ---------------------------------------------------------------------------------------------
# What a verdict rests on, and when it cannot be given


def test_the_verdict_is_consistent_with_its_interval_and_mde():
    arms, rnd, tok, base = simulate(np.random.default_rng(3), [-0.05, 0.0, 0.001])
    res = paired_comparison(arms, rnd, tok, base)
    assert res["family"] == 3
    for a in res["arms"].values():
        lo, hi = a["ci"]
        assert lo <= a["delta"] <= hi and a["ci95"][0] >= lo and a["ci95"][1] <= hi
        if a["verdict"] == "better":
            assert hi < 0 and a["p_holm"] <= 0.05
        elif a["verdict"] == "equivalent":
            assert -a["mde"] < lo and hi < a["mde"]
        else:
            assert lo <= 0 <= hi
    assert res["arms"]["arm0"]["verdict"] == "better"
    assert res["arms"]["arm0"]["gap_fraction"] > 0  # lower than random, which is below base
    assert res["base"]["delta"] > 0  # training on random beats the untrained model
    # Delta is the token-weighted mean of d_ik (spec section 7), computed here directly.
    d = (arms["arm1"] - rnd.mean(axis=0)).sum() / (2 * tok.sum())
    assert res["arms"]["arm1"]["delta"] == pytest.approx(d, abs=1e-12)
    # The same inputs and seed give the same bootstrap.
    assert paired_comparison(arms, rnd, tok, base)["arms"] == res["arms"]


def test_the_standard_error_is_the_design_formula_on_the_measured_parts():
    """For a balanced study the SE of paired_comparison equals design_se on its measured
    components: the plan and the verdict use one formula."""
    arms, rnd, tok, _ = simulate(np.random.default_rng(4), [0.0, 0.0])
    res = paired_comparison(arms, rnd, tok, resamples=0)
    v, a = res["variance"], res["arms"]["arm0"]
    assert v["draw_component"] > 0  # not truncated: the identity is exact
    se, df = design_se(a["row_var"], v["draw_component"], v["seed"], 200, 5, 2, 2 + 5)
    assert float(se) == pytest.approx(a["se"], rel=1e-12)
    assert float(df) == pytest.approx(a["df"], rel=1e-9)


def test_fewer_than_two_random_draws_is_inconclusive_with_that_reason():
    arms, rnd, tok, base = simulate(np.random.default_rng(5), [-0.2], draws=1)
    res = paired_comparison(arms, rnd, tok, base)
    a = res["arms"]["arm0"]
    assert a["verdict"] == "inconclusive" and "fewer than 2 random draws" in a["reason"]
    assert res["family"] == 0 and res["base"] is None
    # A draw whose runs failed is left out the same way.
    arms, rnd, tok, base = simulate(np.random.default_rng(5), [-0.2], draws=2)
    rnd[1, :, :] = np.nan
    assert "fewer than 2" in paired_comparison(arms, rnd, tok)["arms"]["arm0"]["reason"]


def test_failed_runs_are_left_out_and_counted():
    arms, rnd, tok, base = simulate(np.random.default_rng(6), [-0.03, 0.0], seeds=3)
    arms["arm1"][2] = np.nan  # arm1's run at the third seed failed
    rnd[4, 1] = np.nan  # one random run failed: draw 4 or seed 1 goes (keep more runs)
    arms["arm2"] = np.full_like(arms["arm0"], np.nan)  # an arm with no finished run
    res = paired_comparison(arms, rnd, tok, base)
    r = res["random"]
    assert (r["draws"], r["seeds"], r["runs"]) == (4, 3, 12) and r["draw_index"] == [0, 1, 2, 3]
    assert res["arms"]["arm1"]["seeds"] == 2 and res["arms"]["arm1"]["seed_index"] == [0, 1]
    assert res["arms"]["arm0"]["seeds"] == 3
    assert res["arms"]["arm2"]["verdict"] == "inconclusive"
    assert "no finished run" in res["arms"]["arm2"]["reason"]
    assert res["family"] == 2
    # The seed variance pools the random draws and the arms complete on the block's seeds.
    assert res["variance"]["selections_pooled"] == 4 + 1
    # Fewer runs, larger SE than the same arm with all its runs.
    full = paired_comparison(*simulate(np.random.default_rng(6), [-0.03, 0.0], seeds=3))
    assert res["arms"]["arm1"]["se"] > full["arms"]["arm1"]["se"]


def test_one_training_seed_assumes_the_arm_varies_like_a_random_run():
    arms, rnd, tok, _ = simulate(np.random.default_rng(7), [0.0], seeds=1)
    res = paired_comparison(arms, rnd, tok, resamples=0)
    v, a = res["variance"], res["arms"]["arm0"]
    assert v["seed_assumed"] and v["seed"] == v["draw"]
    assert a["se"] ** 2 == pytest.approx(a["row_var"] / 200 + v["draw"] * (1 / 5 + 1), rel=1e-12)


def test_bad_shapes_are_refused():
    arms, rnd, tok, _ = simulate(np.random.default_rng(8), [0.0])
    with pytest.raises(ValueError, match="draws, seeds, rows"):
        paired_comparison(arms, rnd[0], tok)
    with pytest.raises(ValueError, match="arm 'arm0' must be"):
        paired_comparison({"arm0": arms["arm0"][:, :10]}, rnd, tok)


# ---------------------------------------------------------------------------------------------
# Length and style


def test_length_adjustment_removes_a_planted_length_effect():
    """Every selection's Delta is 0.03 per 1,000 response characters above random's mean
    length, plus one arm's own 0.02 quality effect: the slope is recovered and only the
    quality effect is left."""
    lengths = {"long": 2000.0, "short": 300.0, "good": 600.0}
    draw_lengths = [580.0, 600.0, 620.0, 590.0, 610.0]
    rate = -0.03 / 1000
    arms = {
        nm: {"delta": rate * (L - 600.0) + (-0.02 if nm == "good" else 0.0), "se": 0.01, "df": 9}
        for nm, L in lengths.items()
    }
    draws = [rate * (L - 600.0) for L in draw_lengths]
    # A null line with the quality effect as an outlier: fit with the arm left in.
    got = length_adjusted(arms, lengths, draws, draw_lengths)
    assert got["points"] == 8 and got["reference_chars"] == 600.0
    assert got["slope_per_1k_chars"] == pytest.approx(-0.03, abs=0.005)
    assert got["arms"]["long"]["delta"] == pytest.approx(0.0, abs=0.005)
    assert got["arms"]["good"]["delta"] == pytest.approx(-0.02, abs=0.005)
    lo, hi = got["arms"]["long"]["ci95"]
    assert hi - lo > 2 * 1.96 * 0.01  # the slope's uncertainty widens the interval
    assert "reason" in length_adjusted({}, {}, [0.0, 0.0], [600.0, 600.0])


def test_a_win_on_long_references_and_a_loss_on_short_ones_is_a_style_effect():
    per_set = {
        "gpt4": {
            "resp_len": {"delta": -0.034, "ci95": [-0.05, -0.02]},
            "deita": {"delta": -0.011, "ci95": [-0.03, 0.01]},
        },
        "davinci": {
            "resp_len": {"delta": 0.027, "ci95": [0.01, 0.04]},
            "deita": {"delta": 0.017, "ci95": [-0.005, 0.04]},
        },
        "mt_bench": {"resp_len": {"delta": -0.01, "ci95": [-0.03, 0.01]}, "deita": {}},
    }
    got = style_effects(per_set, {"gpt4": 540.0, "davinci": 100.0, "mt_bench": 300.0})
    assert got["resp_len"]["style_effect"] and got["resp_len"]["direction"] == "long references"
    assert got["resp_len"]["wins"] == ["gpt4"] and got["resp_len"]["loses"] == ["davinci"]
    assert not got["deita"]["style_effect"] and got["deita"]["sign_flip"]
    flipped = style_effects(per_set, {"gpt4": 100.0, "davinci": 540.0, "mt_bench": 300.0})
    assert flipped["resp_len"]["direction"] == "short references"


# ---------------------------------------------------------------------------------------------
# The study summary from per-row files (no Ray, no model)


def _config(out: Path, seeds: list[int], arms: list[dict]):
    return load_config(
        data={
            "stages": ["ingest", "score", "embed", "select", "sft", "eval"],
            "input": {"paths": ["pool.json"]},
            "output": {"dir": str(out)},
            "select": {"budget": 256},
            "eval": {
                "sets": [
                    {"name": "long_refs", "paths": ["a.json"]},
                    {"name": "short_refs", "paths": ["b.json"]},
                ]
            },
            "study": {"train_seeds": seeds, "arms": arms},
        }
    )


ARMS = [
    {"method": "base"},
    {"method": "random", "seeds": [0, 1, 2, 3, 4]},
    {"method": "deita"},
    {"method": "response_length"},
    {"method": "score"},
]


def _fake_study(out: Path, cfg, effects: dict, lengths: dict, fail=(), n=120, seed=0):
    """Write what the runs of a finished study leave behind: the pool (for selection
    lengths), each run's selection, report.json and per-row likelihood values with the
    planted effects (``effects[set][arm]``, NLL/token); returns (arms, results)."""
    from deita_ray.study import expand_arms, expand_runs

    rng = np.random.default_rng(seed)
    arms = expand_arms(cfg)
    runs = expand_runs(cfg, arms)
    sets = [s.name for s in cfg.eval.sets]
    pool, picked = [], {}
    for a in arms:
        if a.trains:
            picked[a.name] = [f"{a.name}:{j}" for j in range(8)]
            answer = "a" * int(lengths.get(a.name, 600 + 5 * (a.seed or 0)))
            pool += [
                {
                    "id": i,
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": answer},
                    ],
                }
                for i in picked[a.name]
            ]
    (out / "ingest").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(pool), out / "ingest/part-0.parquet")
    tok = {s: rng.integers(20, 120 if s.startswith("short") else 900, n) for s in sets}
    mu = {s: rng.normal(2.0, 0.3, n) for s in sets}
    draw = {a.name: rng.normal(0, 0.01) for a in arms}
    results = {}
    for r in runs:
        d = out / "arms" / r.name
        d.mkdir(parents=True)
        if r.name in fail:
            results[r.name] = {"status": "failed", "error": "RuntimeError: out of memory"}
            continue
        results[r.name] = {"status": "done", "seconds": 1.0}
        eps = rng.normal(0, 0.006) if r.arm.trains else 0.06
        rep = {}
        for s in sets:
            shift = effects.get(s, {}).get(r.arm.name, 0.0) + eps
            shift += draw[r.arm.name] if r.arm.method == "random" else 0.0
            nll = (mu[s] + shift + rng.normal(0, 0.02, n)) * tok[s]
            f = d / "eval" / s / "likelihood"
            f.mkdir(parents=True)
            pq.write_table(
                pa.table(
                    {
                        "id": [f"{s}:{i}" for i in range(n)],
                        "seq": np.arange(n),
                        "answer_tokens": tok[s].astype(np.int32),
                        "nll_sum": nll,
                    }
                ),
                f / "part-0.parquet",
            )
            value = float(nll.sum() / tok[s].sum())
            rep[s] = {
                "seconds": 0.5 * n,
                "likelihood": {
                    "nll_token_mean": value,
                    "nll_token_mean_ci95": [value, value],
                    "rows": n,
                },
            }
        stages = {"eval": {"seconds": 0.5 * n * len(sets), "metrics": {"sets": rep}}}
        if r.arm.trains:
            (d / "select").mkdir()
            pq.write_table(
                pa.table({"id": picked[r.arm.name], "rank": list(range(8))}),
                d / "select/part-0.parquet",
            )
            stages["select"] = {"seconds": 5.0}
            stages["sft"] = {"seconds": 200.0, "metrics": {"loss_last": 1.5, "steps": 6}}
        (d / "report.json").write_text(json.dumps({"stages": stages}))
    return arms, results


def test_the_summary_reads_per_row_files_and_says_what_it_rests_on(tmp_path, capsys):
    """A finished 2-seed, 5-draw study with planted effects: deita better on both sets,
    response length (whose selection's answers are three times longer) better on long
    references and worse on short ones, one failed run. study.json keeps, per run, the
    per-row values' folder, from which the statistics are recomputed; study.md names the
    primary comparison, the style effect and the failed run; --plan reads it."""
    from deita_ray.study import main, plan_study, render_plan, summarize, write_outputs

    out = tmp_path / "study"
    cfg = _config(out, [42, 43], ARMS)
    effects = {
        "long_refs": {"deita_tau0.9": -0.04, "response_length": -0.05},
        "short_refs": {"deita_tau0.9": -0.04, "response_length": 0.05},
    }
    arms, results = _fake_study(out, cfg, effects, {"response_length": 1800.0}, fail=("score_t43",))
    study = summarize(cfg, str(out), arms, results, {}, {"total_s": 1.0})
    write_outputs(str(out), study)
    saved = json.loads((out / "study.json").read_text())

    lk = saved["comparisons"]["long_refs"]["likelihood"]
    assert (lk["rows"], lk["random"]["runs"], lk["family"]) == (120, 10, 3)
    assert lk["verdicts"] == {
        "deita_tau0.9": "better",
        "response_length": "better",
        "score": lk["arms"]["score"]["verdict"],
    }
    assert lk["arms"]["score"]["runs"] == ["score"]
    assert lk["arms"]["score"]["runs_left_out"] == {
        "score_t43": "failed: RuntimeError: out of memory"
    }

    # Recompute deita's Delta from the per-row files study.json points to.
    def nll(run):
        t = pq.read_table(out / saved["arms"][run]["eval_rows"]["long_refs"]).sort_by("id")
        return t["nll_sum"].to_numpy(), t["answer_tokens"].to_numpy()

    tok = nll("random_s0")[1]
    rand = np.mean([[nll(f"random_s{r}{t}")[0] for t in ("", "_t43")] for r in range(5)], 0)
    arm = np.array([nll("deita_tau0.9")[0], nll("deita_tau0.9_t43")[0]])
    assert lk["arms"]["deita_tau0.9"]["delta"] == pytest.approx(
        (arm - rand).sum() / (2 * tok.sum()), abs=1e-12
    )
    # Style: response length wins on long references, loses on short ones.
    st = saved["style"]["response_length"]
    assert st["style_effect"] and st["direction"] == "long references"
    assert not saved["style"]["deita_tau0.9"]["style_effect"]
    adj = lk["length"]["arms"]["response_length"]
    assert abs(adj["delta"]) < abs(lk["arms"]["response_length"]["delta"])
    assert saved["primary"]["arm"] == "deita_tau0.9" and saved["primary"]["verdict"] == "better"

    md = (out / "study.md").read_text()
    assert "**Primary comparison: deita_tau0.9 vs random on long_refs: better**" in md
    assert "style effect: favours long references" in md
    assert "- score_t43: failed: RuntimeError: out of memory" in md
    assert "| score | " in md and " | 1 + 10 |" in md  # rests on 1 of its 2 runs
    assert (out / "plots/study_metrics.png").stat().st_size > 0

    plan = plan_study(saved, 0.02, max_rows=805)
    assert plan["set"] == "long_refs" and plan["current"]["rows"] == 120
    assert plan["current"]["mde_design"] == pytest.approx(
        lk["arms"]["deita_tau0.9"]["mde"], rel=0.1
    )
    assert plan["designs"] and all(d["mde"] <= 0.02 for d in plan["designs"])
    costs = [d["stage_s"] for d in plan["designs"]]
    assert costs == sorted(costs)
    d0 = plan["designs"][0]  # 205 s to train a run, 0.5 s per eval row per set
    per_eval = 60 + 0.5 * d0["rows"]
    assert d0["stage_s"] == pytest.approx(
        (3 + d0["draws"]) * d0["seeds"] * (205 + per_eval) + per_eval
    )
    assert "Cheapest designs that resolve 0.02" in render_plan(plan)
    assert (
        main(
            [
                "--plan",
                str(out),
                "--resolve",
                "0.001",
                "--max-rows",
                "805",
                "--max-draws",
                "6",
                "--max-seeds",
                "3",
            ]
        )
        == 0
    )
    assert "No design within the limits resolves 0.001" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["--plan", str(tmp_path / "empty")]) == 2


def test_adding_a_training_seed_changes_no_existing_run():
    """The run at sft.seed keeps its folder and every stage hash when seeds are added; the
    new seed's runs train with their own seed; the base model runs once."""
    from deita_ray.pipeline import plan
    from deita_ray.study import arm_config, expand_arms, expand_runs

    one = _config(Path("/tmp/x"), [], ARMS)
    two = _config(Path("/tmp/x"), [42, 7], ARMS)
    runs1 = {r.name: r for r in expand_runs(one, expand_arms(one))}
    runs2 = {r.name: r for r in expand_runs(two, expand_arms(two))}
    assert set(runs1) < set(runs2)
    assert [n for n in runs2 if n not in runs1] == [
        f"{a}_t7"
        for a in [
            "random_s0",
            "random_s1",
            "random_s2",
            "random_s3",
            "random_s4",
            "deita_tau0.9",
            "response_length",
            "score",
        ]
    ]
    for name, r in runs1.items():
        h1 = plan(arm_config(one, r, f"/tmp/x/arms/{name}"), {})
        h2 = plan(arm_config(two, runs2[name], f"/tmp/x/arms/{name}"), {})
        assert h1 == h2, name
    new = arm_config(two, runs2["deita_tau0.9_t7"], "/tmp/x/arms/deita_tau0.9_t7")
    assert new.sft.seed == 7 and new.select.tau == 0.9
    with pytest.raises(ConfigError, match="seed 7 appears twice"):
        expand_runs(_config(Path("/tmp/x"), [7, 7], ARMS), expand_arms(one))
    clash = [*ARMS, {"method": "score", "name": "score_t7"}]
    cfg = _config(Path("/tmp/x"), [42, 7], clash)
    with pytest.raises(ConfigError, match="share the folder arms/score_t7"):
        expand_runs(cfg, expand_arms(cfg))

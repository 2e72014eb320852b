"""benchmarks/gpu_check.py in its --dry-run mode: every part at tiny sizes on CPU, in a process
where ray, vllm and deepspeed cannot be imported (the GPU machine has none of them), so that
the script the rare GPU sessions run cannot rot unseen. Without deepspeed and without a wheel
folder to install it from, the deepspeed part is reported as skipped (not passed); with
deepspeed (and still no ray), it builds the project's engine on CPU and trains."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
RESULT = REPO / "benchmarks" / "results" / "gpu_check.json"
ABSENT_ON_GPU_MACHINE = ("ray", "vllm", "deepspeed")

# None in sys.modules makes `import ray` (and `import ray.data`, ...) raise ImportError, and
# importlib.util.find_spec report the package as absent, as on the GPU machine.
PRELUDE = """
import runpy, sys
sys.modules.update({{name: None for name in {absent!r}}})
sys.argv = {argv!r}
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    loaded = [n for n in {absent!r} if sys.modules.get(n) is not None]
    print("BLOCKED_MODULES_LOADED=" + ",".join(loaded), file=sys.stderr)
"""


def run_dry(
    out: Path, *args: str, absent: tuple[str, ...] = ABSENT_ON_GPU_MACHINE
) -> subprocess.CompletedProcess:
    argv = [str(SCRIPT), "--dry-run", "--peak-tflops", "1", "--out", str(out), *args]
    code = PRELUDE.format(absent=absent, argv=argv, script=str(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_dry_run_reports_every_part_without_ray_vllm_deepspeed(tmp_path):
    before = RESULT.stat().st_mtime_ns if RESULT.exists() else None
    out = tmp_path / "gpu_check.json"
    done = run_dry(out, "--wheels", str(tmp_path / "no_wheels"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "BLOCKED_MODULES_LOADED=\n" in done.stderr
    # The real result file is never touched by a dry run.
    assert (RESULT.stat().st_mtime_ns if RESULT.exists() else None) == before

    # One JSON line per part as it finishes, then the whole report.
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"')]
    names = ["selector", "score_embed", "train", "deepspeed"]
    assert [x["part"] for x in lines if "part" in x] == names
    report = json.loads(out.read_text())
    assert report["mode"] == "dry_run" and report["complete"] and report["ok"]
    assert report["machine"]["torch"] and report["machine"]["python"]
    assert number(report["model"]["params"]) and report["model"]["body_params"] > 0
    parts = report["parts"]
    assert set(parts) == set(names)
    # No deepspeed and no wheels: skipped, said so, and why; never passed.
    ds = parts.pop("deepspeed")
    assert ds["status"] == "skipped" and ds["ok"] is None and ds["skipped"] is True
    assert "deepspeed cannot be imported" in ds["reason"] and "no_wheels" in ds["reason"]
    assert report["skipped"] == ["deepspeed"]
    assert all(p["ok"] and p["status"] == "passed" and number(p["seconds"]) for p in parts.values())

    big = parts["selector"]["large"]
    assert big["ids_check"]["equal_to_numpy"] and big["ids_check"]["picks_compared"] > 0
    assert big["pool_stats"]["selected"] == big["budget"]
    assert 0.5 < big["rejected_share_of_scanned"] < 0.8  # the planted near-duplicates
    assert number(big["best_s"]) and number(big["bare_products"]["seconds"])
    assert number(big["ratios"]["best_over_bare_products"])
    assert parts["selector"]["small"]["ids_equal_across_devices"]

    score = parts["score_embed"]["score"]
    assert score["rows_rejected"] == 0 and score["prompts"] == 2 * report["sizes"]["rows"]
    for key in ("tokens_per_s", "mfu", "pass_s"):
        assert number(score[key]) and score[key] > 0, key
    for ref in ("max_new_tokens_2", "max_new_tokens_1"):
        r = score["reference_per_sample"][ref]
        assert number(r["s_per_prompt"]) and r["max_abs_score_diff_vs_ours"] < 0.05
    assert all(number(v) for v in score["ratios"].values())
    embed = parts["score_embed"]["embed"]
    assert number(embed["tokens_per_s"]) and number(embed["mfu"])
    assert embed["reference_batched_loop"]["min_cosine_vs_ours"] > 0.99

    train = parts["train"]
    assert train["rows_at_full_length"] == train["rows"]  # every sequence fills seq tokens
    assert 0 < train["target_share"] < 1  # assistant-only labels
    assert train["tokens"] == train["timed_steps"] * train["micro_batch"] * train["seq"]
    for key in ("tokens_per_s", "mfu", "loss_first", "loss_last"):
        assert number(train[key]), key


def test_deepspeed_part_builds_the_projects_engine_without_ray(tmp_path):
    """With deepspeed importable but no ray (nor vllm), the part builds the engine through
    deita_ray.training.loop.build_engine (the Ray Train workers' own function) on CPU, with the
    CPU accelerator a use_gpu: false config asks for, and runs its optimizer steps."""
    out = tmp_path / "gpu_check.json"
    done = run_dry(out, "--part", "deepspeed", absent=("ray", "vllm"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "BLOCKED_MODULES_LOADED=\n" in done.stderr
    report = json.loads(out.read_text())
    ds = report["parts"]["deepspeed"]
    assert ds["status"] == "passed" and ds["ok"] is True and report["skipped"] == []
    assert ds["deepspeed_from"] == "installed"
    assert ds["accelerator"] == ds["want_accelerator"] == "cpu"
    assert ds["engine_device"] == "cpu" and ds["param_dtype"] == "torch.float32"
    assert ds["zero_stage"] == 2 and ds["grad_accum"] == 2
    assert ds["optimizer_steps"] == ds["planned_steps"] == report["sizes"]["ds_steps"]
    assert all(number(x) for x in ds["losses"]) and ds["max_weight_change"] > 0


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_picks_match_compares_only_the_prefix_and_fails_on_a_difference():
    gc = _load_script()
    order = np.array([5, 2, 7, 0, 1, 3, 4, 6])  # scan order of 8 rows
    rank = np.empty(8, np.int64)
    rank[order] = np.arange(8)
    ours = np.array([5, 7, 1, 6])  # picks in scan order; 6 lies after a prefix of 5 rows
    assert gc.picks_match(ours, np.array([5, 7, 1]), rank, 5) == (True, 3)
    assert gc.picks_match(ours, np.array([5, 1, 7]), rank, 5)[0] is False  # order matters
    assert gc.picks_match(ours, np.array([5, 7]), rank, 5)[0] is False  # a pick missing
    assert gc.picks_match(ours, np.array([5, 7, 1, 6]), rank, 5)[0] is False  # beyond prefix


def test_dry_run_refuses_the_real_result_path(tmp_path):
    done = run_dry(RESULT, "--part", "selector")
    assert done.returncode == 2 and "never writes" in done.stderr

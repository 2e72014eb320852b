"""The stage registry: one module per stage, in the config's order, read by the pipeline."""

from __future__ import annotations

import json
import os
import pkgutil

import pytest

import deita_ray.stages
from deita_ray.accounting import StageCounts, StageResult
from deita_ray.config import STAGES, load_config
from deita_ray.stages import get_stage, registry
from deita_ray.stages.base import Stage

NOT_STAGES = {"base", "lazy_embed"}  # lazy_embed: the select stage's lazy path


def test_registry_matches_config_stage_list():
    assert [s.name for s in registry()] == list(STAGES)
    modules = {m.name for m in pkgutil.iter_modules(deita_ray.stages.__path__)} - NOT_STAGES
    assert modules == set(STAGES), "every stage module is in config.STAGES and vice versa"


def test_every_descriptor_is_complete():
    for stage in registry():
        assert callable(stage.run), stage.name
        assert stage.config_keys, stage.name
        assert stage.doc, stage.name
        for upstream in stage.reads:
            assert STAGES.index(upstream) < STAGES.index(stage.name), (stage.name, upstream)
        # Every config key a stage depends on exists (depends_on raises AttributeError if not).
        stage.depends_on(load_config(data={"demo_pool": True}))


def test_get_stage_rejects_a_module_without_descriptor():
    with pytest.raises(ModuleNotFoundError):
        get_stage("no_such_stage")


def test_hash_ignores_actor_resources_but_not_models():
    score = get_stage("score")
    a = load_config(data={"demo_pool": True})
    b = load_config(data={"demo_pool": True}, overrides=["score.resources.concurrency=4"])
    c = load_config(data={"demo_pool": True}, overrides=["score.quality_model.max_model_len=64"])
    assert score.depends_on(a) == score.depends_on(b)
    assert score.depends_on(a) != score.depends_on(c)


def test_lazy_embedding_re_runs_embed_not_the_selection_it_equals():
    """The switch is in the embed stage's hash (its folder's content changes), not in select's:
    the selection is the same, and outputs written before the switch existed keep their hash."""
    embed, select = get_stage("embed"), get_stage("select")
    full = load_config(data={"demo_pool": True})
    lazy = load_config(data={"demo_pool": True}, overrides=["select.lazy_embed=true"])
    assert "lazy_embed" not in select.depends_on(full)["select"]
    assert select.depends_on(full) == select.depends_on(lazy)
    assert embed.depends_on(full) != embed.depends_on(lazy)


def _toy_run(cfg, out_dir: str) -> StageResult:
    """A stage written in a test: counts the budget into one JSON file."""
    folder = os.path.join(out_dir, "toy")
    assert not os.path.exists(os.path.join(folder, "out.json")), "pipeline clears before a run"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "out.json"), "w") as f:
        json.dump({"budget": cfg.select.budget}, f)
    n = cfg.select.budget
    return StageResult(StageCounts(rows_in=n, rows_out=n - 1, rejected_by_reason={"toy": 1}), {})


TOY = Stage(name="toy", run=_toy_run, config_keys=("select.budget",), doc="a toy stage")


def test_a_toy_stage_is_one_descriptor(tmp_path, ray_local):
    from deita_ray import pipeline

    cfg = load_config(
        data={"output": {"dir": str(tmp_path)}, "stages": ["select"], "select": {"budget": 7}}
    )
    stages = [*registry(), TOY]
    report = pipeline.run(cfg, stages=stages, enabled=["toy"])
    assert report["stages"]["toy"]["rows_in"] == 7
    assert report["stages"]["toy"]["rejected_by_reason"] == {"toy": 1}
    manifest = pipeline.read_manifest(str(tmp_path))
    assert manifest["stages"]["toy"]["status"] == "done"
    # Same config: skipped; a changed key it depends on: re-run (after its outputs are cleared).
    again = pipeline.run(cfg, stages=stages, enabled=["toy"])
    assert again["stages"]["toy"].get("skipped") is True
    cfg2 = load_config(
        data={"output": {"dir": str(tmp_path)}, "stages": ["select"], "select": {"budget": 9}}
    )
    third = pipeline.run(cfg2, stages=stages, enabled=["toy"])
    assert third["stages"]["toy"]["rows_in"] == 9 and not third["stages"]["toy"].get("skipped")


def test_the_pipeline_core_names_no_stage():
    """Stage-specific behaviour lives in the stage's module: the pipeline, the report, the row
    accounting, the data layer and the training library reach a stage only through the
    registry, so no string literal in them is a stage's name (config.py keeps the one list)."""
    import ast
    from pathlib import Path

    import deita_ray
    from deita_ray.config import STAGES

    root = Path(deita_ray.__file__).parent
    core = [root / n for n in ("pipeline.py", "accounting.py", "preflight.py")]
    core += [root / "report" / n for n in ("assembly.py", "section.py", "plots.py")]
    core += sorted((root / "data").glob("*.py")) + sorted((root / "training").glob("*.py"))
    found = []
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in STAGES:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert found == []

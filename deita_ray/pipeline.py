"""``python -m deita_ray.pipeline``: run a deita_ray job, stage by stage, resumably.

Stages run in pipeline order (ingest -> score -> embed -> select -> sft -> dpo), each reading the
previous stage's Parquet under ``output.dir`` and writing its own. ``<output.dir>/manifest.json``
records, per finished stage, a hash of the configuration that stage depends on (chained with
the hashes of the stages before it). Re-running the same command skips finished stages whose
hash still matches; a stage whose configuration changed re-runs, and so does every stage after
it, because their chained hashes change too.

Works the same on a laptop (a local Ray cluster is started) and inside
``ray job submit -- python -m deita_ray.pipeline ...`` (``RAY_ADDRESS`` is set there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

from deita_ray.config import (
    EMBEDDED_MODEL,
    STAGES,
    ConfigError,
    PipelineConfig,
    config_hash,
    describe,
    load_config,
    to_dict,
)

log = logging.getLogger("deita_ray")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SHARD_RESUMABLE = ("ingest", "score", "embed")
"""Stages that write through data/sink.py and so can keep the parts an interrupted run wrote."""


def stage_config(cfg: PipelineConfig, stage: str) -> dict:
    """The part of the configuration whose change must re-run ``stage`` (and what follows)."""
    d = to_dict(cfg)
    parts: dict[str, Any] = {
        "ingest": {"input": d["input"], "demo_pool": d["demo_pool"]},
        "score": {"score": d["score"]},
        "embed": {"embed": d["embed"], "embedding_dtype": d["output"]["embedding_dtype"]},
        "select": {"select": d["select"]},
        "sft": {"sft": d["sft"], "base": d["embed"]["model"]["path"] if not cfg.sft.model else ""},
        "dpo": {"dpo": d["dpo"]},
    }
    part = parts[stage]
    if stage in ("score", "embed", "sft", "dpo"):
        # Where the models come from matters; how many actors run them does not.
        for section in ("score", "embed"):
            if section in part:
                part[section] = {k: v for k, v in part[section].items() if k != "resources"}
    return part


def _stage_runner(stage: str) -> Callable:
    """Import a stage's entry point lazily (heavy modules load only when the stage runs)."""
    if stage == "ingest":
        from deita_ray.stages.ingest import run_ingest as fn
    elif stage == "score":
        from deita_ray.stages.score import run_score as fn
    elif stage == "embed":
        from deita_ray.stages.embed import run_embed as fn
    elif stage == "select":
        from deita_ray.selection.stage import run_select as fn
    elif stage == "sft":
        from deita_ray.training.sft import run_sft as fn
    elif stage == "dpo":
        from deita_ray.training.dpo import run_dpo as fn
    else:  # pragma: no cover - config validation rejects unknown stages
        raise ValueError(stage)
    return fn


def read_manifest(out_dir: str) -> dict:
    """The manifest of an output directory (empty when none)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return {"version": MANIFEST_VERSION, "stages": {}}
    with open(path) as f:
        return json.load(f)


def _write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _clear_stage_outputs(out_dir: str, stage: str) -> None:
    for path in (os.path.join(out_dir, stage), os.path.join(out_dir, "rejects", stage)):
        if os.path.isdir(path):
            shutil.rmtree(path)


def plan(cfg: PipelineConfig, manifest: dict) -> list[tuple[str, str, bool]]:
    """Decide, per stage of the job, its chained hash and whether it must run.

    Returns:
        ``[(stage, chained_hash, must_run), ...]`` for the stages in ``cfg.stages``.
    """
    done = manifest.get("stages", {})
    out: list[tuple[str, str, bool]] = []
    upstream = ""
    invalidated = False
    for stage in STAGES:
        entry = done.get(stage)
        if stage in cfg.stages:
            h = config_hash({"stage": stage, "own": stage_config(cfg, stage), "up": upstream})
            must = invalidated or not (
                entry and entry.get("status") == "done" and entry.get("hash") == h
            )
            invalidated = invalidated or must
            out.append((stage, h, must))
            upstream = h
        elif entry and entry.get("status") == "done":
            # A stage not run now but finished earlier feeds later stages with its outputs.
            upstream = entry["hash"]
            if invalidated:
                log.warning(
                    "stage %s is not in this job's stages, but an earlier stage it depends "
                    "on re-runs: its old outputs are kept as they are",
                    stage,
                )
    return out


def run(cfg: PipelineConfig) -> dict:
    """Run a validated job. Returns the report dict (also written to ``report.json``)."""
    out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
    os.makedirs(out_dir, exist_ok=True)
    manifest = read_manifest(out_dir)
    manifest["version"] = MANIFEST_VERSION
    manifest["config"] = to_dict(cfg)
    steps = plan(cfg, manifest)

    from deita_ray.runtime import init_ray

    cluster = init_ray(cfg.ray)
    log.info("ray cluster: %s", cluster)

    results: dict[str, dict] = {}
    for stage, h, must_run in steps:
        if not must_run:
            log.info("stage %s: finished earlier with the same config, skipped", stage)
            results[stage] = dict(manifest["stages"][stage]["result"], skipped=True)
            continue
        previous = manifest["stages"].get(stage, {})
        resumable = stage in SHARD_RESUMABLE and previous.get("hash") == h
        if resumable and previous.get("status") == "running":
            # Same settings, interrupted run: keep the parts it finished (see data/sink.py).
            log.info("stage %s: resuming an interrupted run", stage)
        else:
            log.info("stage %s: running", stage)
            _clear_stage_outputs(out_dir, stage)
        manifest["stages"][stage] = {"status": "running", "hash": h}
        _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
        t0 = time.perf_counter()
        result = _stage_runner(stage)(cfg, out_dir)
        seconds = time.perf_counter() - t0
        result.counts.check(stage)
        entry = dict(
            result.counts.to_dict(),
            seconds=round(seconds, 3),
            rows_per_s=round(result.counts.rows_in / seconds, 2) if seconds > 0 else None,
            metrics=result.metrics,
        )
        results[stage] = entry
        manifest["stages"][stage] = {
            "status": "done",
            "hash": h,
            "finished_at": time.time(),
            "result": entry,
        }
        _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
        log.info(
            "stage %s: done in %.1fs: in=%d out=%d rejected=%d %s",
            stage,
            seconds,
            entry["rows_in"],
            entry["rows_out"],
            entry["rows_rejected"],
            entry["rejected_by_reason"] or "",
        )

    from deita_ray.report import write_report

    return write_report(out_dir, results, notes=_notes(cfg))


def _notes(cfg: PipelineConfig) -> list[str]:
    notes = []
    if "score" in cfg.stages and EMBEDDED_MODEL in (
        cfg.score.complexity_model.path,
        cfg.score.quality_model.path,
    ):
        notes.append(
            "Scores come from the embedded SmolLM2-135M-Instruct prompted with the DEITA scorer "
            "templates: a stand-in for the deita-complexity-scorer / deita-quality-scorer models, "
            "good for exercising the pipeline, not for judging data."
        )
    if cfg.demo_pool:
        notes.append("Input is the built-in demo pool (written to <output.dir>/demo_pool.jsonl).")
    return notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deita_ray.pipeline",
        description="Run a deita_ray job: ingest -> score -> embed -> select -> sft -> dpo.",
    )
    p.add_argument("--config", "-c", help="job YAML (see jobs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key; VALUE is parsed as YAML "
        "(e.g. --set select.budget=6000 --set stages=[ingest])",
    )
    p.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with its type, default and meaning, then exit",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved, validated config as YAML, then exit",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.help_config:
        print("\n".join(describe()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        return 0
    report = run(cfg)
    out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
    print(
        json.dumps(
            {
                "output_dir": out_dir,
                "report": os.path.join(out_dir, "report.json"),
                "stages": {
                    s: {k: v for k, v in r.items() if k != "metrics"}
                    for s, r in report.get("stages", {}).items()
                },
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

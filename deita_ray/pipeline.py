"""``python -m deita_ray.pipeline``: run a deita_ray job, stage by stage, resumably.

Stages run in pipeline order (``config.STAGES``, the stage registry), each reading the
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
import threading
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from deita_ray.config import (
    STAGES,
    ConfigError,
    PipelineConfig,
    config_hash,
    describe,
    load_config,
    to_dict,
)
from deita_ray.data.sink import decisions_dir, rejects_dir, stage_dir
from deita_ray.stages import registry

if TYPE_CHECKING:
    from deita_ray.stages.base import Stage

log = logging.getLogger("deita_ray")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
"""Version 2: stage hashes come from the stage descriptors (deita_ray/stages/base.py)."""


def stage_config(cfg: PipelineConfig, stage: Stage) -> dict:
    """The part of the configuration whose change must re-run ``stage`` (and what follows)."""
    return stage.depends_on(cfg)


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


def clear_stage_outputs(out_dir: str, stage: str) -> None:
    """Remove a stage's outputs, rejects and decisions: the one place a stage's earlier work
    is dropped."""
    for path in (
        stage_dir(out_dir, stage),
        rejects_dir(out_dir, stage),
        decisions_dir(out_dir, stage),
    ):
        if os.path.isdir(path):
            shutil.rmtree(path)


def check_failure_budget(cfg: PipelineConfig, stage: str, counts: Any, out_dir: str) -> None:
    """Stop the job when ``stage`` rejected more rows than ``failure_budget`` allows.

    Raises:
        FailureBudgetExceeded: naming the stage, the reason, and an example rejected row.
    """
    from deita_ray.accounting import over_budget

    fb = cfg.failure_budget
    err = over_budget(
        stage,
        counts,
        fb.stages.get(stage, fb.max_rejected_fraction),
        fb.reasons,
        fb.min_rows,
    )
    if err is None:
        return
    example = example_reject(out_dir, stage, err.reason)
    hint = (
        f"failure_budget.reasons.{err.reason}" if err.reason else f"failure_budget.stages.{stage}"
    )
    err.args = (
        f"{err.args[0]}. Example: {example or 'none on disk'}. The rows written so far are kept: "
        f"fix the cause and re-run to resume (or raise {hint} if these rejects are expected).",
    )
    raise err


def example_reject(out_dir: str, stage: str, reason: str | None) -> str | None:
    """One rejected row of ``stage`` (with ``reason`` when given), as a short text."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    from deita_ray.data.sink import parquet_files, rejects_dir

    files = parquet_files(rejects_dir(out_dir, stage))
    if not files:
        return None
    dataset = pds.dataset(files, format="parquet")
    filt = pc.field("reason") == reason if reason else None
    for batch in dataset.to_batches(columns=["id", "reason", "detail", "raw"], filter=filt):
        if batch.num_rows:
            row = batch.slice(0, 1).to_pylist()[0]
            raw = (row.get("raw") or "")[:200]
            return f"id={row['id']!r} reason={row['reason']} detail={row['detail']!r} raw={raw!r}"
    return None


class StageProgress:
    """While a stage that writes its output part by part runs, log every ``every_s`` seconds
    how many rows it has written (accepted and rejected) out of its input rows, e.g.
    ``stage score: 1200/5000 rows (24.0%), 9.5 rows/s``: a console under ``ray job submit``
    or in a log file shows where a long job is."""

    def __init__(self, stage: Stage, out_dir: str, every_s: float):
        self.stage, self.out_dir, self.every_s = stage, out_dir, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def input_rows(self) -> int | None:
        """Rows of the first folder the stage reads that has parts (None: no such folder)."""
        import pyarrow.parquet as pq

        from deita_ray.data.sink import parquet_files, stage_dir

        for name in self.stage.reads:
            files = parquet_files(stage_dir(self.out_dir, name))
            if files:
                return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        return None

    def __enter__(self) -> StageProgress:
        if self.every_s > 0:
            self._thread = threading.Thread(
                target=self._run, name=f"progress-{self.stage.name}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        from deita_ray.data.sink import WrittenRows

        try:
            total = self.input_rows()
            written = WrittenRows(self.out_dir, self.stage.name)
            start, t0 = written.count(), time.monotonic()
            while not self._stop.wait(self.every_s):
                n = written.count()
                rate = (n - start) / max(time.monotonic() - t0, 1e-9)
                if total:
                    log.info(
                        "stage %s: %d/%d rows (%.1f%%), %.1f rows/s",
                        self.stage.name,
                        n,
                        total,
                        100.0 * n / total,
                        rate,
                    )
                else:
                    log.info("stage %s: %d rows, %.1f rows/s", self.stage.name, n, rate)
        except Exception as e:  # noqa: BLE001 - progress lines must never stop a job
            log.debug("stage %s: progress lines stopped: %s", self.stage.name, e)


def plan(
    cfg: PipelineConfig,
    manifest: dict,
    stages: Sequence[Stage] | None = None,
    enabled: Collection[str] | None = None,
) -> list[tuple[str, str, bool]]:
    """Decide, per stage of the job, its chained hash and whether it must run.

    Args:
        cfg: the validated job.
        manifest: the output directory's manifest (:func:`read_manifest`).
        stages: the stage descriptors in pipeline order (default: the registry).
        enabled: names of the stages to run (default: ``cfg.stages``).

    Returns:
        ``[(stage, chained_hash, must_run), ...]`` for the enabled stages, in order.
    """
    stages = registry() if stages is None else stages
    enabled = set(cfg.stages if enabled is None else enabled)
    done = manifest.get("stages", {})
    out: list[tuple[str, str, bool]] = []
    upstream = ""
    invalidated = False
    for desc in stages:
        stage = desc.name
        entry = done.get(stage)
        if stage in enabled:
            h = config_hash({"stage": stage, "own": stage_config(cfg, desc), "up": upstream})
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


def run(
    cfg: PipelineConfig,
    stages: Sequence[Stage] | None = None,
    enabled: Collection[str] | None = None,
) -> dict:
    """Run a validated job. Returns the report dict (also written to ``report.json``).

    ``stages`` / ``enabled`` default to the registry and ``cfg.stages`` (see :func:`plan`).
    """
    out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
    os.makedirs(out_dir, exist_ok=True)
    manifest = read_manifest(out_dir)
    manifest["version"] = MANIFEST_VERSION
    manifest["config"] = to_dict(cfg)
    stages = registry() if stages is None else stages
    by_name = {desc.name: desc for desc in stages}
    steps = plan(cfg, manifest, stages, enabled)
    # Every model a stage that will run loads must be reachable now, not hours in.
    from deita_ray.preflight import check_models_reachable

    pending = [name for name, _, must_run in steps if must_run and name in by_name]
    registered = {desc.name for desc in registry()}
    check_models_reachable(dataclasses.replace(cfg, stages=[n for n in pending if n in registered]))

    from deita_ray.runtime import init_ray

    cluster = init_ray(cfg.ray)
    log.info(
        "ray cluster: %s, resources %s%s",
        cluster["address"],
        {k: v for k, v in cluster["resources"].items() if not k.startswith("node:")},
        f"; Ray's own logs: {cluster['logs']}" if cluster.get("logs") else "",
    )

    results: dict[str, dict] = {}
    for stage, h, must_run in steps:
        desc = by_name[stage]
        if not must_run:
            log.info("stage %s: finished earlier with the same config, skipped", stage)
            results[stage] = dict(manifest["stages"][stage]["result"], skipped=True)
            continue
        previous = manifest["stages"].get(stage, {})
        # Resume or clear, decided here only: a shard-resumable stage interrupted with the
        # same settings keeps the parts it finished (score and embed by row, data/sink.py;
        # ingest by input file, stages/ingest.py); anything else starts from empty folders.
        if (
            desc.resumes_by_shard
            and previous.get("hash") == h
            and previous.get("status") == "running"
        ):
            from deita_ray.data.sink import WrittenRows

            log.info(
                "stage %s: resuming an interrupted run (%d rows on disk; it keeps what it finished)",
                stage,
                WrittenRows(out_dir, stage).count(),
            )
        else:
            log.info("stage %s: running", stage)
            clear_stage_outputs(out_dir, stage)
        manifest["stages"][stage] = {"status": "running", "hash": h}
        _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
        t0 = time.perf_counter()
        every_s = cfg.output.progress_every_s if desc.writes_parts else 0.0
        with StageProgress(desc, out_dir, every_s):
            result = desc.run(cfg, out_dir)
        seconds = time.perf_counter() - t0
        result.counts.check(stage)
        if desc.rejects_are_failures:
            # The manifest still says "running": what the stage wrote stays for a resume.
            check_failure_budget(cfg, stage, result.counts, out_dir)
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

    return write_report(out_dir, results, notes=_notes(cfg, stages))


def _notes(cfg: PipelineConfig, stages: Sequence[Stage]) -> list[str]:
    notes = [
        note
        for desc in stages
        if desc.name in cfg.stages and desc.notes is not None
        for note in desc.notes(cfg)
    ]
    if cfg.demo_pool:
        notes.append("Input is the built-in demo pool (written to <output.dir>/demo_pool.jsonl).")
    return notes


def job_parser(prog: str, description: str, config_help: str) -> argparse.ArgumentParser:
    """The arguments every job CLI shares (pipeline, study): --config, --set, --help-config
    and --log-level."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "-c", help=config_help)
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
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def start_job(args: argparse.Namespace) -> PipelineConfig | int:
    """Set up logging and load the job's config; an exit code instead when the CLI is done
    (--help-config printed: 0; a bad config, named on stderr: 2)."""
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.help_config:
        print("\n".join(describe()))
        return 0
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = job_parser(
        "python -m deita_ray.pipeline",
        "Run a deita_ray job: " + " -> ".join(STAGES) + ".",
        "job YAML (see jobs/)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved, validated config as YAML, then exit",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = start_job(args)
    if isinstance(cfg, int):
        return cfg
    if args.print_config:
        import yaml

        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        return 0
    try:
        report = run(cfg)
    except ConfigError as e:  # e.g. a model the job needs is not reachable (preflight)
        print(f"config error: {e}", file=sys.stderr)
        return 2
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

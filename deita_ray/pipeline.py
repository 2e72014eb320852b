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

from deita_ray.accounting import current_entry, done_line
from deita_ray.config import (
    STAGES,
    ConfigError,
    PipelineConfig,
    config_hash,
    to_dict,
)
from deita_ray.data.sink import decisions_dir, rejects_dir, stage_dir
from deita_ray.job import check_names, describe_job, load_job
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


def write_json_atomic(path: str, data: Any) -> None:
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
    """While a stage runs, log where it is (docs/README.md#the-console), in the ``deita_ray``
    log, so a console under ``ray job submit`` or a log file shows where a long job is.

    - A stage whose batch callables count their batches (``Stage.counts_batches``: score,
      embed, eval) gets a :class:`deita_ray.progress.ProgressCounter` actor for its run
      (:func:`deita_ray.progress.current_counter`): ``stage score: loading model (45 s)``
      until the first batch is done, then ``stage score: 1200/5000 rows (24.0%), 9.5 rows/s,
      ETA 6.7 min`` every ``every_s`` seconds (rows an interrupted run wrote count as done).
    - A training stage (``Stage.trains``) gets one too: ``loading model`` until the first
      optimizer step, then ``stage sft: step 10/24 (41.7%), loss 1.2345, lr 4.50e-05,
      812 tokens/s, ETA 3.2 min`` for step 1, every ``every_steps``-th step and the last.
    - Other stages that write part by part (ingest) count the rows of their finished parts:
      ``stage ingest: 1200 rows, 9.5 rows/s``.
    """

    POLL_S = 1.0
    """Seconds between two polls of a training stage's counter for its step lines."""

    POLL_TIMEOUT_S = 120.0
    """A counter that does not answer a poll in this long ends the progress lines (the stage
    runs on; its actor starts in seconds even on a busy node)."""

    def __init__(self, stage: Stage, out_dir: str, every_s: float, every_steps: int = 0):
        self.stage, self.out_dir, self.every_s = stage, out_dir, every_s
        self.every_steps = every_steps if stage.trains else 0
        self.counter: Any = None
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
        self._t_enter = time.monotonic()
        if self.every_s <= 0 and self.every_steps <= 0:
            return self
        if self.stage.counts_batches or self.stage.trains:
            self.counter = _start_counter(self.every_steps)
            if self.counter is not None:
                from deita_ray import progress

                progress.set_current(self.counter)
        self._thread = threading.Thread(
            target=self._run, name=f"progress-{self.stage.name}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.counter is None:
            return
        from deita_ray import progress

        progress.set_current(None)
        try:
            import ray

            # The steps since the last poll.
            self._log_steps(ray.get(self.counter.poll.remote(), timeout=self.POLL_TIMEOUT_S))
            ray.kill(self.counter)
        except Exception as e:  # noqa: BLE001 - progress lines must never stop a job
            log.debug("stage %s: progress counter: %s", self.stage.name, e)
        self.counter = None

    def _log_steps(self, snap: dict) -> None:
        from deita_ray.progress import step_line

        for rec in snap["steps"]:
            log.info("%s", step_line(self.stage.name, rec))

    def _run(self) -> None:
        from deita_ray.data.sink import WrittenRows
        from deita_ray.progress import rows_line

        try:
            total = self.input_rows() if not self.stage.trains else None
            written = WrittenRows(self.out_dir, self.stage.name)
            start, t0 = written.count(), time.monotonic()
            tick = self.every_s
            if self.counter is not None and self.every_steps > 0:
                tick = min(tick, self.POLL_S) if tick > 0 else self.POLL_S
            next_line = t0 + self.every_s
            while not self._stop.wait(tick):
                snap = None
                if self.counter is not None:
                    import ray

                    snap = ray.get(self.counter.poll.remote(), timeout=self.POLL_TIMEOUT_S)
                    self._log_steps(snap)
                    if snap["label"] is None:  # waiting since the stage began, not the actor
                        snap["waited_s"] = time.monotonic() - self._t_enter
                if self.every_s <= 0 or time.monotonic() < next_line - 1e-3:
                    continue
                next_line += self.every_s
                if snap is not None:
                    if not (self.stage.trains and snap["started"]):  # steps have their lines
                        log.info("%s", rows_line(self.stage.name, snap, total, start))
                    continue
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


def _start_counter(every_steps: int) -> Any:
    """A :class:`deita_ray.progress.ProgressCounter` actor on the driver's node, or None when
    Ray is not running here (a stage run outside the pipeline) or the actor cannot start."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from deita_ray.progress import ProgressCounter
        from deita_ray.runtime import driver_side_actor

        return driver_side_actor(ProgressCounter, every_steps)
    except Exception as e:  # noqa: BLE001 - progress lines must never stop a job
        log.debug("no progress counter: %s", e)
        return None


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

    Before Ray starts: ``output.dir`` must be writable, no other run may hold it
    (:mod:`deita_ray.data.lock`), and the input files and models of the stages that will run
    must be there (:mod:`deita_ray.preflight`); otherwise it raises without touching
    ``manifest.json``.

    Raises:
        ConfigError: an input, the output folder or a model is not usable (named with its key).
        OutputDirInUse: another running job holds ``output.dir``.
    """
    from deita_ray.data.lock import OutputLock
    from deita_ray.preflight import check_output_dir

    check_names(cfg)  # the names registries hold (record formats, scorer kinds, select.score)
    out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
    check_output_dir(out_dir)
    # One run per output folder: a second one refuses here (OutputDirInUse) instead of
    # overwriting the first one's files.
    with OutputLock(out_dir):
        return _run(cfg, out_dir, stages, enabled)


def _run(
    cfg: PipelineConfig,
    out_dir: str,
    stages: Sequence[Stage] | None,
    enabled: Collection[str] | None,
) -> dict:
    manifest = read_manifest(out_dir)
    manifest["version"] = MANIFEST_VERSION
    manifest["config"] = to_dict(cfg)
    stages = registry() if stages is None else stages
    by_name = {desc.name: desc for desc in stages}
    steps = plan(cfg, manifest, stages, enabled)
    # Every input file a stage that will run reads, and every model it loads, must be there
    # now, before a Ray cluster starts, not minutes or hours in.
    from deita_ray.preflight import (
        check_inputs_readable,
        check_models_fit,
        check_models_reachable,
        disk_warning,
    )

    pending = [name for name, _, must_run in steps if must_run and name in by_name]
    registered = {desc.name for desc in registry()}
    pending_cfg = dataclasses.replace(cfg, stages=[n for n in pending if n in registered])
    check_inputs_readable(pending_cfg)
    check_models_reachable(pending_cfg)
    check_models_fit(pending_cfg, out_dir)
    low_disk = disk_warning(pending_cfg, out_dir)
    if low_disk:
        log.warning("%s", low_disk)

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
            results[stage] = dict(
                current_entry(manifest["stages"][stage]["result"], desc.selects), skipped=True
            )
            continue
        previous = manifest["stages"].get(stage, {})
        # Resume or clear, decided here only: a shard-resumable stage interrupted with the
        # same settings keeps the parts it finished (score and embed by row, data/sink.py;
        # ingest by input file, stages/ingest.py); anything else starts from empty folders.
        if (
            desc.resumes_by_shard
            and previous.get("hash") == h
            and previous.get("status") in ("running", "failed")
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
        write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
        if desc.models is not None:
            _note_actor_restart_line()
        t0 = time.perf_counter()
        live = desc.writes_parts or desc.counts_batches or desc.trains
        every_s = cfg.output.progress_every_s if live else 0.0
        try:
            with StageProgress(desc, out_dir, every_s, cfg.output.progress_every_steps):
                result = desc.run(cfg, out_dir)
            seconds = time.perf_counter() - t0
            result.counts.check(stage)
            if desc.rejects_are_failures:
                check_failure_budget(cfg, stage, result.counts, out_dir)
        except BaseException as e:
            # Say so in the manifest: the stage did not finish (what it wrote stays for a
            # resume); a killed driver leaves "running", which says the same.
            manifest["stages"][stage] = {
                "status": "failed",
                "hash": h,
                "failed_at": time.time(),
                "error": f"{type(e).__name__}: {e}"[:1000],
            }
            write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
            raise
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
        write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
        log.info("%s", done_line(stage, seconds, entry))

    from deita_ray.report import write_report

    return write_report(out_dir, results, notes=_notes(cfg, stages))


_ACTOR_LINE_NOTED = False


def _note_actor_restart_line() -> None:
    """Say once per process what the ``E`` line Ray prints as the first actor pool starts is.

    Ray's core worker logs, at level E and once per process, ``... has constructor arguments in
    the object store and max_restarts > 0`` whenever an actor that may restart gets an object
    reference as a constructor argument (ray-project/ray#53727). Ray Data's pool workers always
    do: ``_MapWorker`` receives the DataContext and the map transform by ``ObjectRef``, whatever
    the stage passes (ray-project/ray#57733: a trivial ``map_batches`` class prints it too).
    Only ``max_restarts=0`` would silence it, and that would stop Ray from recreating model
    actors lost with a node; so the line stays, explained here.
    """
    global _ACTOR_LINE_NOTED
    if _ACTOR_LINE_NOTED:
        return
    _ACTOR_LINE_NOTED = True
    log.info(
        "Ray may now print one 'E ... core_worker.cc ... has constructor arguments in the object "
        "store and max_restarts > 0' line: not an error of this job (Ray Data passes its actor "
        "pools' setup by object reference, ray-project/ray#57733; actor restarts stay on)"
    )


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


def setup_logging(level: str | int = logging.INFO) -> None:
    """The job's log lines (the driver's, and a study run's in its Ray task)."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def start_job(args: argparse.Namespace) -> PipelineConfig | int:
    """Set up logging and load the job's config; an exit code instead when the CLI is done
    (--help-config printed: 0; a bad config, named on stderr: 2)."""
    setup_logging(args.log_level)
    if args.help_config:
        print("\n".join(describe_job()))
        return 0
    try:
        return load_job(args.config, args.overrides)
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
    from deita_ray.data.lock import OutputDirInUse

    try:
        report = run(cfg)
    except ConfigError as e:  # e.g. an input file or a model the job needs is missing (preflight)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except OutputDirInUse as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
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

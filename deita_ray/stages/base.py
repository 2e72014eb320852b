"""What a pipeline stage is: one :class:`Stage` descriptor per module under ``deita_ray/stages``.

A stage is data, in the manner of ``ray.data.llm``'s processor stages: its name, the config
keys whose change must re-run it, the folders and columns it reads and writes, whether it
resumes by shard, and the function that runs it. The pipeline (``deita_ray/pipeline.py``)
reads these descriptors for order, config hashing, resume-or-clear and dispatch; preflight reads
the models and inputs they declare (:class:`ModelToLoad`, :class:`InputToRead`, defined here so
that the stages import nothing above them). A stage knows nothing of the report: the report's
section of a stage is in :mod:`deita_ray.report.sections`, keyed by the stage's name.

A stage's ``run(cfg, out_dir)`` may assume:

- Ray is initialised;
- ``<out_dir>/<name>`` and ``<out_dir>/rejects/<name>`` are empty, or, for a stage with
  ``resumes_by_shard``, hold only parts that an interrupted run with the same settings
  finished (the pipeline decides which, in one place: :func:`deita_ray.pipeline.run`).

It returns a :class:`~deita_ray.accounting.StageResult`; the pipeline checks its accounting.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from deita_ray.accounting import StageResult
    from deita_ray.config import PipelineConfig
    from deita_ray.training.memory import GpuUse


# ---------------------------------------------------------------------------------------------
# What a stage declares (deita_ray.preflight reads these before Ray starts)


class ModelToLoad(NamedTuple):
    """One model a stage loads: where the path comes from, the path, and its remote-code flag."""

    key: str
    path: str
    trust_remote_code: bool


class InputToRead(NamedTuple):
    """Files a stage reads: the config key, its entries, how to read them, and the key that
    says how (None where the files' names alone decide)."""

    key: str
    paths: list[str]
    file_format: str
    format_key: str | None


def same_path(a: str, b: str) -> bool:
    """Whether two local paths name the same place (after ``~`` and relative resolution)."""
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def config_part(cfg: PipelineConfig, dotted: str) -> Any:
    """The plain-data value of a dotted config key (``"embed.model.path"``)."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node


TRAINING_HASH_IGNORE: tuple[str, ...] = ("custom_resources", "keep_checkpoints", "checkpoint_dir")
"""Training settings that change where the workers run and where checkpoints are kept, not what
they compute: left out of the training stages' hashes."""


def running_stage_hash(out_dir: str, stage: str) -> str | None:
    """The config hash the pipeline recorded for ``stage`` as it started it, from
    ``<out_dir>/manifest.json`` (status ``running``); None when the stage runs outside the
    pipeline. A stage that keeps work across runs (the training stages' checkpoints) keeps it
    only under this hash: the same rule as the shard-resumable stages' parts."""
    import json
    import os

    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            entry = (json.load(f).get("stages") or {}).get(stage) or {}
    except (OSError, ValueError, AttributeError):
        return None
    return entry.get("hash") if entry.get("status") == "running" else None


def _drop_keys(value: Any, drop: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        return {k: _drop_keys(v, drop) for k, v in value.items() if k not in drop}
    return value


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, described.

    Attributes:
        name: the stage's name in ``stages:`` and its output folder ``<out_dir>/<name>``.
        run: ``run(cfg, out_dir) -> StageResult``; heavy imports happen inside it.
        config_keys: dotted config keys whose value this stage depends on; their change
            re-runs it (and, through the chained hash, every stage after it).
        hash_ignore: keys dropped anywhere inside those values before hashing: settings
            that change how a stage runs but not what it writes (e.g. actor counts).
        extra_hash: optional ``fn(cfg) -> JSON-able`` for dependencies that are not a plain
            key (e.g. SFT's base model defaults to the embedder's); None adds nothing.
        reads: stage folders it reads, in order of preference (the first that has outputs).
        input_columns: columns it needs from what it reads.
        output_columns: columns of ``<out_dir>/<name>/*.parquet``.
        resumes_by_shard: an interrupted run keeps the parts it finished and a re-run with the
            same settings only works on the rest; otherwise a run starts from empty folders.
        writes_parts: it writes its output part by part as it goes, so the pipeline can log
            its progress from the rows on disk (``output.progress_every_s``).
        counts_batches: its batch callables report each finished batch to the stage's
            progress counter (:func:`deita_ray.progress.count_rows`), so the pipeline logs
            rows done, rows/s and an ETA from them, and ``loading model`` until the first batch.
        trains: it trains a model and reports a per-step ``loss`` history (plotted).
        rejects_are_failures: its rejected rows count against the failure budget (the select
            stage's "not selected" rows do not).
        models: optional ``fn(cfg) -> list[ModelToLoad]``: the models it loads from outside
            the job, which :mod:`deita_ray.preflight` checks before the first stage runs.
        gpu_uses: optional ``fn(cfg, out_dir) -> list[GpuUse]``: the models it puts on GPUs
            and how (engine or training config), for the start-up memory check.
        inputs: optional ``fn(cfg) -> list[InputToRead]``: the input files it reads from
            outside the job, which :mod:`deita_ray.preflight` checks before Ray starts.
        selects: the rows it reads and does not pick are *not selected*
            (``StageCounts.not_selected_by_reason``), not rejected.
        notes: optional ``fn(cfg) -> list[str]``: caveats about this run the report shows
            (e.g. a stand-in model), when the stage is in the job.
        doc: one line for ``--help`` and the report.
    """

    name: str
    run: Callable[[PipelineConfig, str], StageResult]
    config_keys: tuple[str, ...]
    hash_ignore: tuple[str, ...] = ()
    extra_hash: Callable[[PipelineConfig], Any] | None = None
    reads: tuple[str, ...] = ()
    input_columns: tuple[str, ...] = ()
    output_columns: tuple[str, ...] = ()
    resumes_by_shard: bool = False
    writes_parts: bool = False
    counts_batches: bool = False
    trains: bool = False
    rejects_are_failures: bool = True
    models: Callable[[PipelineConfig], list[ModelToLoad]] | None = None
    inputs: Callable[[PipelineConfig], list[InputToRead]] | None = None
    gpu_uses: Callable[[PipelineConfig, str], list[GpuUse]] | None = None
    selects: bool = False
    notes: Callable[[PipelineConfig], list[str]] | None = None
    doc: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def depends_on(self, cfg: PipelineConfig) -> dict[str, Any]:
        """The part of ``cfg`` whose change must re-run this stage (hashed by the pipeline)."""
        part: dict[str, Any] = {
            key: _drop_keys(config_part(cfg, key), self.hash_ignore) for key in self.config_keys
        }
        extra = self.extra_hash(cfg) if self.extra_hash is not None else None
        if extra is not None:  # None: nothing beyond the keys (the hash is the keys' alone)
            part["extra"] = extra
        return part

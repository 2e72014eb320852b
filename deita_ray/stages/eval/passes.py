"""What every eval metric shares: which model is evaluated, and one Ray Data pass of a model
over the rows into ``<out>/eval/<set>/<metric>`` (shard by shard, resumable)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray.config import ModelConfig, PipelineConfig
from deita_ray.data.sink import parquet_files, rejects_dir, stage_dir
from deita_ray.progress import begin_phase, current_counter

NAME = "eval"


# ---------------------------------------------------------------------------------------------
# Which model


def eval_model(cfg: PipelineConfig, out_dir: str) -> tuple[str, str]:
    """``(loadable path, what it is)`` of the model to evaluate (see ``eval.model``)."""
    from deita_ray.models.registry import resolve_model_path

    if cfg.eval.model.path:
        return resolve_model_path(cfg.eval.model.path, cfg.cache_dir), "eval.model.path"
    if "dpo" in cfg.stages:
        return os.path.join(out_dir, "dpo", "final"), "dpo"
    if "sft" in cfg.stages or os.path.isdir(os.path.join(out_dir, "sft", "final")):
        return os.path.join(out_dir, "sft", "final"), "sft"
    from deita_ray.stages.sft import sft_model_path

    return sft_model_path(cfg), "base"


def model_identity(cfg: PipelineConfig) -> str:
    # Which model is evaluated, for the stage hash: trained outputs are covered by the chain.
    if cfg.eval.model.path:
        return cfg.eval.model.path
    if "dpo" in cfg.stages:
        return "dpo"
    if "sft" in cfg.stages:
        return "sft"
    return "base:" + (cfg.sft.model or cfg.embed.model.path)


def engine_cfg(model: ModelConfig, path: str) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(model, path=path)


# ---------------------------------------------------------------------------------------------
# Running a pass


def run_pass(
    table: pa.Table,
    fn: type,
    kwargs: dict,
    pool: Any,
    model_cfg: ModelConfig,
    out_dir: str,
    key: str,
) -> None:
    """Map ``table`` through the actor class ``fn`` into ``<out_dir>/<key>`` (rejects into
    ``<out_dir>/rejects/<key>``), skipping rows (by ``seq``) a previous run finished. With live
    progress (:mod:`deita_ray.progress`) the pass is a phase of its own: ``<set>/<metric>``."""
    import ray

    from deita_ray.data.sink import SplitParquetSink, skip_finished
    from deita_ray.runtime import map_batches_kwargs

    counter = current_counter()
    if counter is not None:
        label = key.split("/", 1)[-1]  # eval/<set>/<metric> -> <set>/<metric>
        done = table.num_rows - to_finish(table, out_dir, key)
        counter = begin_phase(counter, label, table.num_rows, done)
    ds = skip_finished(ray.data.from_arrow(table), out_dir, key)
    ds = ds.map_batches(
        fn,
        fn_constructor_kwargs={**kwargs, "progress": counter},
        batch_format="pyarrow",
        **map_batches_kwargs(pool, model_cfg),
    )
    ds.write_datasink(SplitParquetSink(NAME, stage_dir(out_dir, key), rejects_dir(out_dir, key)))


def run_model_pass(
    cfg: PipelineConfig,
    rows: pa.Table,
    fn: type[ModelCallable],
    model: tuple[str, str],
    out_dir: str,
    key: str,
    **kwargs: Any,
) -> None:
    """:func:`run_pass` of ``fn(model_cfg, model_path, **kwargs)`` hosting the evaluated model
    (``model``: :func:`eval_model`'s path and what it is), when rows are left to finish."""
    if rows.num_rows and to_finish(rows, out_dir, key):
        engine = engine_cfg(cfg.eval.model, model[0])
        run_pass(
            rows,
            fn,
            {"model_cfg": engine, "model_path": model[0], **kwargs},
            cfg.eval.resources,
            engine,
            out_dir,
            key,
        )


class ModelCallable:
    """A Ray Data callable hosting one model, loaded for :attr:`task` (``score``: prefill,
    ``generate``); ``progress``: the stage's progress counter (:mod:`deita_ray.progress`), told
    the rows of each finished batch, or None."""

    task = "score"

    def __init__(self, model_cfg: ModelConfig, model_path: str, progress: Any = None):
        from deita_ray.models.backend import load_backend

        self.backend = load_backend(model_cfg, model_path, self.task)
        self.progress = progress


def read_folder(folder: str, columns: list[str] | None = None) -> pa.Table | None:
    files = parquet_files(folder)
    if not files:
        return None
    return pa.concat_tables(
        [pq.read_table(f, columns=columns) for f in files], promote_options="default"
    ).sort_by("seq")


def reason_counts(folder: str) -> dict[str, int]:
    t = read_folder(folder, ["seq", "reason"])
    return dict(Counter(t["reason"].to_pylist())) if t is not None else {}


def to_finish(table: pa.Table, out_dir: str, key: str) -> int:
    from deita_ray.data.sink import finished_seqs

    done = finished_seqs(out_dir, key)
    return int(np.count_nonzero(~np.isin(table["seq"].to_numpy(), done)))

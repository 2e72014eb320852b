"""The scorer registry: every kind of score the ``score`` stage can compute, in one place.

A *kind* is one module under ``deita_ray/scorers`` exporting ``KINDS = {name: ScorerKind}``
(see :mod:`deita_ray.scorers.base`); registering it is one line in :data:`KIND_MODULES`. The
config (``score.scorers``) lists scorers, each of one kind; :func:`resolve_scorers` turns that
list into :class:`~deita_ray.scorers.base.ScorerSpec` objects (model defaults filled in, column
names fixed), and :func:`model_groups` puts the scorers that share a model config into one
group, i.e. one engine in one actor pool. What each kind writes and how it folds turns into a
row value is in its module docstring and in ``docs/scoring.md``.

Importing this package is light (no torch, vLLM, transformers, numpy): the config imports
:data:`KIND_NAMES` for its choices.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deita_ray.config import ModelConfig, PipelineConfig, ScorerConfig
    from deita_ray.scorers.base import ScorerKind, ScorerSpec

KIND_MODULES: dict[str, str] = {
    "deita_complexity": "deita",
    "deita_quality": "deita",
    "perplexity": "perplexity",
    "ifd": "ifd",
    "rating": "rating",
    "length": "length",
}
"""Kind name -> module under ``deita_ray.scorers`` that defines it."""

KIND_NAMES: tuple[str, ...] = tuple(KIND_MODULES)

EVOL = "evol_score"
"""Row column the stage writes when a deita_complexity and a deita_quality scorer both ran:
``sum_i complexity_i * quality_i`` over turns (the paper's evol score)."""

TRUNCATED = "truncated"
"""Row column: some scorer cut this row's text to fit its model (OR over the scorers)."""

RESERVED_COLUMNS: frozenset[str] = frozenset(
    {
        "id",
        "seq",
        "messages",
        "source",
        "format",
        "extra",
        EVOL,
        TRUNCATED,
        "embedding",
        "embed_truncated",
        "rank",
        "max_sim",
        "select_score",
        "_reject_reason",
        "_reject_detail",
        "_raw",
    }
)
"""Column names no scorer may write (pool columns and columns later stages write)."""


def get_kind(kind: str) -> ScorerKind:
    """The :class:`~deita_ray.scorers.base.ScorerKind` registered as ``kind``."""
    if kind not in KIND_MODULES:
        raise ValueError(f"unknown scorer kind {kind!r} (allowed: {', '.join(KIND_NAMES)})")
    module = importlib.import_module(f"deita_ray.scorers.{KIND_MODULES[kind]}")
    return module.KINDS[kind]


def _model_for(cfg: PipelineConfig, sc: ScorerConfig) -> ModelConfig | None:
    """The scorer's model config: its own, or the DEITA pair's legacy keys for DEITA kinds."""
    if sc.model is not None:
        return sc.model
    if sc.kind == "deita_complexity":
        return cfg.score.complexity_model
    if sc.kind == "deita_quality":
        return cfg.score.quality_model
    return None


def resolve_scorers(cfg: PipelineConfig, resolve_paths: bool = False) -> list[ScorerSpec]:
    """``score.scorers`` as checked, resolved specs (config errors name the key).

    Args:
        cfg: the job config.
        resolve_paths: also turn model paths into loadable local folders (converts the
            embedded model on first use; the driver does this before starting actors).

    Raises:
        ConfigError: a scorer's settings do not fit its kind, or two scorers write the same
            column.
    """
    from deita_ray.config import ConfigError  # noqa: PLC0415

    specs: list[ScorerSpec] = []
    owner: dict[str, str] = {}
    for i, sc in enumerate(cfg.score.scorers):
        key = f"score.scorers[{i}]"
        kind = get_kind(sc.kind)
        model = _model_for(cfg, sc)
        spec = kind.build_spec(sc, model, key, digit_token_ids=cfg.score.digit_token_ids)
        for col in spec.columns.values():
            if col in RESERVED_COLUMNS:
                raise ConfigError(
                    f"{key}.name: column {col!r} is reserved (pool and stage columns: "
                    f"{', '.join(sorted(RESERVED_COLUMNS))})"
                )
            if col in owner:
                raise ConfigError(
                    f"{key}.name: column {col!r} is also written by {owner[col]}; give one "
                    "of them another name"
                )
            owner[col] = key
        if resolve_paths and model is not None:
            from deita_ray.models.registry import resolve_model_path  # noqa: PLC0415

            spec = spec.with_path(resolve_model_path(model.path, cfg.cache_dir))
        specs.append(spec)
    return specs


def evol_pair(specs: list[ScorerSpec]) -> tuple[str, str] | None:
    """Turn columns of the first deita_complexity and deita_quality scorers (evol's inputs)."""
    comp = next((s for s in specs if s.kind == "deita_complexity"), None)
    qual = next((s for s in specs if s.kind == "deita_quality"), None)
    if comp is None or qual is None:
        return None
    return comp.columns["turn"], qual.columns["turn"]


def row_columns(specs: list[ScorerSpec]) -> list[str]:
    """Row-level numeric columns the scorers write (what ``select.score`` may name), plus
    ``evol_score`` when the DEITA pair is configured."""
    from deita_ray.scorers.base import ROW  # noqa: PLC0415

    out = [EVOL] if evol_pair(specs) is not None else []
    for spec in specs:
        kind = get_kind(spec.kind)
        out.extend(
            spec.columns[o.key] for o in kind.outputs if o.level == ROW and o.key in spec.columns
        )
    return out


def model_groups(specs: list[ScorerSpec]) -> list[list[ScorerSpec]]:
    """Scorers grouped by model config, in order of first appearance: one engine, one actor
    pool per group. Scorers of kinds that load no model (``length``) form no group."""
    groups: list[tuple[Any, list[ScorerSpec]]] = []
    for spec in specs:
        if not get_kind(spec.kind).uses_model:
            continue
        for model, members in groups:
            if model == spec.model:
                members.append(spec)
                break
        else:
            groups.append((spec.model, [spec]))
    return [members for _, members in groups]


def cpu_scorers(specs: list[ScorerSpec]) -> list[ScorerSpec]:
    """Scorers that run as CPU tasks (no model actor)."""
    return [s for s in specs if not get_kind(s.kind).uses_model]

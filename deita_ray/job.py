"""A job: the config tree (:mod:`deita_ray.config`) plus the names in it that registries hold.

The config is a leaf and checks shapes and ranges only. A value that names something a registry
knows is checked here, by asking that registry, when a job is loaded for a run
(:func:`load_job`, what the CLIs call) and again when the pipeline builds its plan
(:func:`check_names`):

- ``input.format``: a record format of :mod:`deita_ray.data.formats` (or ``auto``);
- ``score.scorers[].kind``: a scorer kind of :mod:`deita_ray.scorers`, and each scorer's
  settings fit its kind (:func:`deita_ray.scorers.resolve_scorers`);
- ``export.formats``: export formats of :mod:`deita_ray.data.exports`;
- ``select.score`` (when ``select`` runs): an expression of :mod:`deita_ray.selection.score_expr`
  over row columns the scorers write.

The messages are the config's own (:func:`deita_ray.config.check_choice`), and
:func:`describe_job` is ``--help-config`` with the registries' names filled in.

Example:
    >>> cfg = load_job("jobs/quickstart.yaml", overrides=["select.budget=100"])
    >>> cfg.select.budget
    100
"""

from __future__ import annotations

from pathlib import Path

from deita_ray.config import (
    ConfigError,
    PipelineConfig,
    check_choice,
    describe,
    load_config,
)


def registered_names() -> dict[str, tuple[tuple, str | None]]:
    """Per config key whose values a registry holds: (the allowed values, the key's
    ``--help-config`` doc when the registry writes it, else None)."""
    from deita_ray.data.exports import EXPORT_FORMATS
    from deita_ray.data.formats import RECORD_FORMATS
    from deita_ray.scorers import KIND_NAMES

    formats_doc = (
        "Record shape. 'auto' detects it per record, the first match in this order: "
        + ", ".join(f"{f.detected_by} -> {f.name}" for f in RECORD_FORMATS.values())
        + "."
    )
    return {
        "input.format": (("auto", *RECORD_FORMATS), formats_doc),
        "score.scorers[].kind": (tuple(KIND_NAMES), None),
        "export.formats": (tuple(EXPORT_FORMATS), None),
    }


def describe_job() -> list[str]:
    """``--help-config``: :func:`deita_ray.config.describe` with the registries' names."""
    return describe(names=registered_names())


def check_names(cfg: PipelineConfig) -> PipelineConfig:
    """Check every name of ``cfg`` that a registry holds (module docstring); returns ``cfg``.

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    names = registered_names()
    check_choice("input.format", cfg.input.format, names["input.format"][0])
    for i, sc in enumerate(cfg.score.scorers):
        check_choice(f"score.scorers[{i}].kind", sc.kind, names["score.scorers[].kind"][0])
    check_choice("export.formats", cfg.export.formats, names["export.formats"][0])
    check_scores(cfg)
    return cfg


def check_scores(cfg: PipelineConfig) -> None:
    """The scorers fit their kinds, and (when select runs) select.score names only columns
    they write."""
    from deita_ray.scorers import evol_pair, resolve_scorers, row_columns
    from deita_ray.selection.score_expr import ScoreExpressionError, parse

    if not cfg.score.scorers:
        raise ConfigError("score.scorers: at least one scorer is required")
    specs = resolve_scorers(cfg)
    if "select" not in cfg.stages:
        return
    try:
        expr = parse(cfg.select.score)
    except ScoreExpressionError as e:
        raise ConfigError(f"select.score: {e}") from None
    available = row_columns(specs)
    unknown = [n for n in expr.names if n not in available]
    if unknown:
        hint = ""
        if unknown[0] == "evol_score" and evol_pair(specs) is None:
            hint = " (evol_score needs a deita_complexity and a deita_quality scorer)"
        elif unknown[0] in {"complexity", "quality"}:
            hint = f" (the deita_{unknown[0]} scorer writes it with columns: [turn, row])"
        raise ConfigError(
            f"select.score: {unknown[0]!r} is not a row column the scorers write{hint}; "
            f"allowed: {', '.join(available) or 'none'}"
        )


def load_job(
    path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None
) -> PipelineConfig:
    """:func:`deita_ray.config.load_config` (same arguments), then :func:`check_names`: the
    job as the CLIs load it.

    Raises:
        ConfigError: naming the offending key, the bad value and what is allowed.
    """
    return check_names(load_config(path, overrides, data))

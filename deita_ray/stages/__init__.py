"""The stage registry: every pipeline stage is one module here exporting ``STAGE``.

The order is :data:`deita_ray.config.STAGES` (the config's list of stage names); stage modules
are imported on first use, so ``import deita_ray.stages`` stays light. Adding a stage is one
module here plus its config section (and its name in ``config.STAGES``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deita_ray.stages.base import Stage


def get_stage(name: str) -> Stage:
    """The descriptor of stage ``name`` (imports ``deita_ray.stages.<name>``)."""
    module = importlib.import_module(f"deita_ray.stages.{name}")
    stage = getattr(module, "STAGE", None)
    if stage is None or stage.name != name:
        raise TypeError(f"deita_ray.stages.{name} must export STAGE = Stage(name={name!r}, ...)")
    return stage


def registry() -> list[Stage]:
    """Every stage, in pipeline order."""
    from deita_ray.config import STAGES

    return [get_stage(name) for name in STAGES]

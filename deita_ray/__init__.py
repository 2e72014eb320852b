"""deita_ray: the DEITA data-selection loop (score, embed, select, fine-tune) on Ray.

Importing this package is cheap: it loads no torch, vLLM or DeepSpeed. Heavy backends are
imported inside the stages that use them, on the Ray workers that run them.

``load_config`` here is :func:`deita_ray.job.load_job`: the config tree
(:func:`deita_ray.config.load_config`) and the names in it that registries hold, checked.
"""

from deita_ray.config import PipelineConfig
from deita_ray.job import load_job

load_config = load_job

__version__ = "0.1.0"
__all__ = ["PipelineConfig", "load_config", "load_job", "__version__"]

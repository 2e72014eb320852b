"""deita_ray: the DEITA data-selection loop (score, embed, select, fine-tune) on Ray.

Importing this package is cheap: it loads no torch, vLLM or DeepSpeed. Heavy backends are
imported inside the stages that use them, on the Ray workers that run them.
"""

from deita_ray.config import PipelineConfig, load_config

__version__ = "0.1.0"
__all__ = ["PipelineConfig", "load_config", "__version__"]

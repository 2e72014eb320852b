"""The one place that turns config into Ray: cluster connection and actor-pool resources."""

from __future__ import annotations

import os
from typing import Any

from deita_ray.config import ActorPoolConfig, ModelConfig, RayConfig

# vLLM's CPU engine reserves a core for itself and drops torch to one thread unless told
# otherwise; on small machines that halves throughput (measured on 2 cores: 1.6x faster with
# both). Users can override any of these through ray.env_vars.
# No DS_ACCELERATOR here: this env reaches every worker of the job, GPU training workers
# included, and the driver (on KubeRay a CPU-only head) cannot tell what they see. Each training
# worker sets its own from its use_gpu (deita_ray/training/loop.py, select_accelerator).
DEFAULT_WORKER_ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def worker_env(ray_cfg: RayConfig | None = None, num_threads: int | None = None) -> dict[str, str]:
    """Environment variables for Ray workers: defaults, thread count, then the user's."""
    env = dict(DEFAULT_WORKER_ENV)
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    if ray_cfg is not None:
        env.update(ray_cfg.env_vars)
    return env


REQUIRE_AUTH_ENV = "DEITA_REQUIRE_RAY_AUTH"
"""Set to 1 in the pods of cluster/*.yaml: the job refuses to run on a cluster without Ray token
authentication (see :func:`check_required_auth`)."""


def check_required_auth(environ: dict[str, str] | None = None) -> None:
    """Stop the job when ``$DEITA_REQUIRE_RAY_AUTH`` is 1 and Ray token auth is not on.

    The manifests of cluster/ ask for token auth with ``spec.authOptions``, which KubeRay knows
    since 1.5.1. An older operator, with kubectl's field validation turned off, drops the field
    and starts the cluster without auth; the operator then injects no ``RAY_AUTH_MODE=token``
    into the Ray containers, and the driver (a process of the head's Ray container) sees that.

    Raises:
        RuntimeError: naming the variable, what it found, and the operator version needed.
    """
    env = os.environ if environ is None else environ
    if env.get(REQUIRE_AUTH_ENV, "").strip() not in ("1", "true", "yes"):
        return
    mode = env.get("RAY_AUTH_MODE", "")
    if mode.strip().lower() != "token":
        raise RuntimeError(
            f"{REQUIRE_AUTH_ENV}=1 but this Ray cluster runs without token authentication "
            f"(RAY_AUTH_MODE={mode or 'unset'}): the KubeRay operator did not apply "
            "spec.authOptions. It needs KubeRay >= 1.5.1 (>= 1.6.0 for "
            "authOptions.secretName); see cluster/README.md. Refusing to run a job on a cluster "
            "anyone who reaches its dashboard could submit jobs to."
        )


# Read by Ray Data in the driver process when a dataset is planned. Ray Data 2.60 starts 32
# footer-reader actors for every read_parquet; the stages read a few hundred files of their
# own, and on a small node 32 fresh worker processes cost seconds of CPU at every stage.
DEFAULT_DRIVER_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}


def apply_driver_env(ray_cfg: RayConfig | None = None) -> None:
    """Set the driver-side Ray Data defaults in this process, unless the environment (or
    ``ray.env_vars``) already sets them."""
    env = dict(DEFAULT_DRIVER_ENV)
    if ray_cfg is not None:
        env.update({k: v for k, v in ray_cfg.env_vars.items() if k in DEFAULT_DRIVER_ENV})
    for key, value in env.items():
        os.environ.setdefault(key, value)


def has_cuda() -> bool:
    """Whether this process sees a CUDA GPU (False where torch is not installed)."""
    try:
        import torch  # noqa: PLC0415 - heavy, only when asked

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def init_ray(ray_cfg: RayConfig) -> dict[str, Any]:
    """Connect to the cluster named by the config or RAY_ADDRESS, or start a local one.

    Token authentication is left as Ray configures it (on by default for local clusters).

    Returns:
        ``{"address": ..., "started_local": bool, "resources": {...}}`` for the report.
    """
    import ray

    check_required_auth()
    apply_driver_env(ray_cfg)
    # Datasets created by this driver inherit it (model actors can be slow to show progress).
    ray.data.DataContext.get_current().execution_no_progress_timeout_s = ray_cfg.stall_timeout_s
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return {"address": "existing", "started_local": False, "resources": ray.cluster_resources()}
    if address:
        ray.init(
            address=address,
            runtime_env={"env_vars": worker_env(ray_cfg)},
            log_to_driver=ray_cfg.log_to_driver,
        )
        started_local = False
    else:
        ncpu = ray_cfg.num_cpus or os.cpu_count() or 1
        ray.init(
            address="local",  # a new cluster, never one that happens to run on this machine
            num_cpus=ncpu,
            num_gpus=ray_cfg.num_gpus,
            object_store_memory=ray_cfg.object_store_memory,
            runtime_env={"env_vars": worker_env(ray_cfg, num_threads=ncpu)},
            include_dashboard=False,
            log_to_driver=ray_cfg.log_to_driver,
        )
        started_local = True
    if not ray_cfg.log_to_driver:
        quiet_driver_console()
    return {
        "address": address or "local",
        "started_local": started_local,
        "resources": ray.cluster_resources(),
        "logs": _logs_dir(),
    }


def quiet_driver_console() -> None:
    """Keep Ray Data's own driver-side lines off the console (``ray.log_to_driver: false``).

    Its INFO lines (execution plans, "Starting execution of Dataset ...") still go to the
    session's ``logs/ray-data/ray-data.log``; its warnings stay on the console. Without a
    terminal (``ray job submit``, a log file) Ray Data would print a 15-line progress table
    every 10 s per dataset; the pipeline's own one-line progress replaces it. In a terminal its
    progress bars stay.
    """
    import logging
    import sys

    import ray.data
    from ray.util.debug import log_once

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(max(handler.level, logging.WARNING))
    if not sys.stdout.isatty():
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Ray Data warns once that its bars are off, with advice for notebook users; the
        # pipeline turned them off on purpose (the key is Ray Data's own log_once key).
        log_once("ray_data_progress_manager_disabled")


def _logs_dir() -> str | None:
    """The Ray session's log folder on this machine (None when Ray does not say)."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path() if _global_node is not None else None
    except (ImportError, AttributeError):  # a private API: its absence only loses the hint
        return None


def driver_side_actor(cls: type, *args: Any) -> Any:
    """Start ``cls`` as a CPU-free Ray actor on the node this code runs on (the driver's).

    For the small bookkeeping actors a stage's workers report to (row ledgers, counters):
    left to the scheduler, a zero-CPU actor may land on any worker node and die with it,
    taking the counts with it and failing a job that Ray Data would otherwise have carried
    through the node loss. The driver's node lives as long as the job does.
    """
    import ray  # noqa: PLC0415
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(cls).remote(*args)


PoolSize = int | tuple[int, int]
"""An actor pool's size: a fixed number of actors, or (min, max) for an autoscaling pool."""


def map_batches_kwargs(
    pool: ActorPoolConfig | PoolSize,
    model: ModelConfig | None = None,
    *,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    batch_size: int | None = None,
    resources: dict[str, float] | None = None,
) -> dict[str, Any]:
    """``map_batches`` keyword arguments for a callable class run in an actor pool.

    The one builder of actor-pool settings: ``compute=ray.data.ActorPoolStrategy(...)``, the
    current API (``concurrency=`` is deprecated since Ray 2.51 and warns on every stage).

    Args:
        pool: a stage's pool config (size, CPUs, GPUs and batch size per actor), or the pool
            size alone: ``n`` actors, or ``(min, max)`` for a pool that autoscales.
        model: the model the actors host; a vLLM model with tensor parallelism on GPUs
            reserves one GPU per tensor-parallel worker.
        num_cpus, num_gpus, batch_size: override the pool config's values (without a pool
            config: 1 CPU, no GPU, Ray Data's default batch size).
        resources: custom Ray resources per actor (default: the pool config's
            ``custom_resources``): only nodes that offer them host an actor, a restarted one too.

    Fault tolerance is Ray Data's default for actor pools: a killed actor is restarted (its
    model reloaded) and its unfinished batches are retried, while an exception in the
    constructor fails the stage at once. (Ray 2.60 deprecates passing ``max_restarts`` through
    ``map_batches``, so the defaults are not overridden here.)
    """
    import ray.data  # noqa: PLC0415 - only when a stage is planned

    if isinstance(pool, ActorPoolConfig):
        size: PoolSize = (
            (pool.concurrency, pool.max_concurrency)
            if pool.max_concurrency > pool.concurrency
            else pool.concurrency
        )
        num_cpus = pool.num_cpus if num_cpus is None else num_cpus
        num_gpus = pool.num_gpus if num_gpus is None else num_gpus
        batch_size = pool.batch_size if batch_size is None else batch_size
        resources = pool.custom_resources if resources is None else resources
    else:
        size = pool
    num_gpus = 0.0 if num_gpus is None else num_gpus
    if model is not None and model.backend == "vllm" and num_gpus > 0:
        # Tensor parallel vLLM workers need one GPU each inside the actor's reservation.
        num_gpus = max(num_gpus, float(model.tensor_parallel_size))
    if isinstance(size, tuple):
        low, high = size
        compute = ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    else:
        compute = ray.data.ActorPoolStrategy(size=size)
    kwargs: dict[str, Any] = {
        "compute": compute,
        "num_cpus": 1.0 if num_cpus is None else num_cpus,
        "num_gpus": num_gpus,
    }
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    if resources:
        kwargs["resources"] = dict(resources)
    return kwargs

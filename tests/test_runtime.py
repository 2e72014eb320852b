"""runtime.py: the worker environment and actor-pool resources the stages run with."""

from __future__ import annotations

import logging
import warnings

import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray.config import ActorPoolConfig, ModelConfig, RayConfig
from deita_ray.runtime import map_batches_kwargs, worker_env


def test_worker_env_defaults_threads_and_user_overrides():
    env = worker_env(RayConfig(env_vars={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}), num_threads=3)
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"  # the user's value wins
    assert "OMP_NUM_THREADS" not in worker_env()


def test_map_batches_kwargs_reserve_one_gpu_per_tensor_parallel_rank():
    pool = ActorPoolConfig(concurrency=2, num_cpus=4, num_gpus=1, batch_size=64)
    kw = map_batches_kwargs(pool, ModelConfig(backend="vllm", tensor_parallel_size=4))
    compute = kw.pop("compute")
    assert (compute.min_size, compute.max_size) == (2, 2)
    assert kw == {"num_cpus": 4, "num_gpus": 4.0, "batch_size": 64}
    assert map_batches_kwargs(pool, ModelConfig(backend="hf"))["num_gpus"] == 1
    cpu_pool = ActorPoolConfig(num_gpus=0)
    assert map_batches_kwargs(cpu_pool, ModelConfig(backend="vllm"))["num_gpus"] == 0


def test_map_batches_kwargs_from_a_size_or_a_range():
    kw = map_batches_kwargs((1, 3), num_cpus=2, batch_size=8)
    assert (kw["compute"].min_size, kw["compute"].max_size) == (1, 3)
    assert (kw["num_cpus"], kw["num_gpus"], kw["batch_size"]) == (2, 0.0, 8)
    kw = map_batches_kwargs(1)
    assert (kw["compute"].min_size, kw["compute"].max_size) == (1, 1)
    assert "batch_size" not in kw and kw["num_cpus"] == 1.0  # Ray Data's default batch size
    # explicit values win over the pool config's
    kw = map_batches_kwargs(ActorPoolConfig(num_cpus=1, batch_size=64), batch_size=4)
    assert kw["batch_size"] == 4


def test_a_pool_config_with_max_concurrency_autoscales():
    import pytest

    from deita_ray.config import ConfigError, load_config

    cfg = load_config(
        data={"demo_pool": True, "score": {"resources": {"concurrency": 2, "max_concurrency": 16}}}
    )
    compute = map_batches_kwargs(cfg.score.resources)["compute"]
    assert (compute.min_size, compute.max_size) == (2, 16)
    fixed = map_batches_kwargs(load_config(data={"demo_pool": True}).score.resources)["compute"]
    assert (fixed.min_size, fixed.max_size) == (1, 1)
    with pytest.raises(ConfigError, match=r"embed.resources.max_concurrency: 2 must be 0 .* >= co"):
        load_config(
            data={
                "demo_pool": True,
                "embed": {"resources": {"concurrency": 4, "max_concurrency": 2}},
            }
        )


class _Identity:
    def __call__(self, batch):
        return batch


def _deprecation_notes(ray, **kwargs) -> list[str]:
    """Deprecation warnings and log lines that planning one ``map_batches`` emits."""
    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Grab(logging.WARNING)
    logger = logging.getLogger("ray.data")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ray.data.range(8).map_batches(_Identity, batch_format="pyarrow", **kwargs)
    finally:
        logger.removeHandler(handler)
    return [m for m in seen + [str(w.message) for w in caught] if "deprecated" in m.lower()]


def test_map_batches_kwargs_emit_no_deprecation_warning(ray_local):
    # The capture sees Ray's warning for the old argument ("``concurrency`` is deprecated in
    # Ray 2.51"), so an empty list below means the stages' settings do not trigger it.
    assert any("concurrency" in m for m in _deprecation_notes(ray_local, concurrency=1))
    for pool in (ActorPoolConfig(concurrency=2, batch_size=4), 1, (1, 2)):
        assert _deprecation_notes(ray_local, **map_batches_kwargs(pool)) == []


def test_custom_resources_pin_the_actors_to_the_nodes_that_offer_them():
    pool = ActorPoolConfig(custom_resources={"scorer_node": 1.0})
    assert map_batches_kwargs(pool)["resources"] == {"scorer_node": 1.0}
    assert "resources" not in map_batches_kwargs(ActorPoolConfig())
    kw = map_batches_kwargs(1, resources={"trainer_node": 1.0})
    assert kw["resources"] == {"trainer_node": 1.0}
    assert "resources" not in map_batches_kwargs(1)


def test_quiet_driver_console_keeps_ray_data_info_in_its_log_file(monkeypatch):
    import logging
    import sys

    import ray.data

    from deita_ray.runtime import quiet_driver_console

    logger = logging.getLogger("ray.data")
    saved = {h: h.level for h in logger.handlers}
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    try:
        quiet_driver_console()
        console = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
        console = [h for h in console if isinstance(h, logging.StreamHandler)]
        files = [h for h in logger.handlers if h not in console]
        assert console and all(h.level == logging.WARNING for h in console)
        assert files and all(h.level == saved[h] for h in files)  # the file keeps INFO
        assert not ctx.enable_progress_bars  # no terminal: the pipeline's own progress lines
    finally:
        for h, level in saved.items():
            h.setLevel(level)
        ctx.enable_progress_bars = bars


def test_a_parquet_read_starts_few_footer_reader_actors(ray_local, tmp_path):
    """Ray Data's default is 32 footer-reader actors per read_parquet; the driver env that
    init_ray (and the ray_local fixture) applies caps them (on a 2-CPU node, 32 new worker
    processes cost seconds of CPU at every stage)."""
    ray = ray_local
    for i in range(3):
        pq.write_table(pa.table({"x": list(range(i * 10, i * 10 + 10))}), tmp_path / f"{i}.parquet")

    def footer_readers() -> set[str]:
        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        table = ray._private.state.actors(job_id=job)
        return {a["ActorID"] for a in table.values() if "FooterReader" in a["ActorClassName"]}

    before = footer_readers()
    assert len(ray.data.read_parquet(str(tmp_path)).take_all()) == 30
    started = footer_readers() - before
    assert 1 <= len(started) <= 2, f"{len(started)} footer-reader actors started"


def test_init_ray_sets_the_stall_timeout(ray_local):
    import ray

    from deita_ray.config import RayConfig
    from deita_ray.runtime import init_ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    try:
        init_ray(RayConfig(stall_timeout_s=-1))
        assert ctx.execution_no_progress_timeout_s == -1
        init_ray(RayConfig())
        assert ctx.execution_no_progress_timeout_s == 7200.0
    finally:
        ctx.execution_no_progress_timeout_s = before


def test_worker_env_forces_no_accelerator_on_the_jobs_workers():
    """The job-wide env reaches GPU training workers too: it must not pick DeepSpeed's
    accelerator for them (each training worker sets its own, training/loop.py)."""
    assert "DS_ACCELERATOR" not in worker_env(RayConfig(), num_threads=2)
    # A user who really wants one for every worker still can.
    assert worker_env(RayConfig(env_vars={"DS_ACCELERATOR": "cpu"}))["DS_ACCELERATOR"] == "cpu"


def test_a_job_that_requires_ray_auth_refuses_a_cluster_without_it():
    """cluster/*.yaml set DEITA_REQUIRE_RAY_AUTH=1; a KubeRay operator too old for
    spec.authOptions starts the cluster without auth and injects no RAY_AUTH_MODE=token."""
    import pytest

    from deita_ray.runtime import check_required_auth

    check_required_auth({})  # not required: nothing checked (local runs, tests)
    check_required_auth({"RAY_AUTH_MODE": "disabled"})
    check_required_auth({"DEITA_REQUIRE_RAY_AUTH": "1", "RAY_AUTH_MODE": "token"})
    for env in (
        {"DEITA_REQUIRE_RAY_AUTH": "1"},
        {"DEITA_REQUIRE_RAY_AUTH": "1", "RAY_AUTH_MODE": "disabled"},
    ):
        with pytest.raises(RuntimeError, match=r"without token authentication.*KubeRay >= 1\.5\.1"):
            check_required_auth(env)

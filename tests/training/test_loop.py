"""The training loop's resume point (pure file-system checks, no Ray)."""

from __future__ import annotations


def test_newest_complete_checkpoint_needs_the_state_and_every_ranks_mark(tmp_path):
    """A restarted worker group resumes from the newest checkpoint on storage that every rank
    finished uploading; half-written ones (no state, a missing mark) are passed over."""
    import json

    from deita_ray.training.loop import (
        TRAINER_STATE,
        UPLOADED_MARK,
        newest_complete_checkpoint,
    )

    def write(step: int, world: int, marks: list[int], state: bool = True) -> str:
        folder = tmp_path / f"checkpoint_step{step:06d}"
        folder.mkdir()
        if state:
            (folder / TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": world}))
        for r in marks:
            (folder / f"{UPLOADED_MARK}{r}").touch()
        return str(folder)

    assert newest_complete_checkpoint(str(tmp_path)) is None
    two = write(2, world=2, marks=[0, 1])
    write(3, world=2, marks=[0])  # rank 1 died while uploading
    write(4, world=2, marks=[0, 1], state=False)  # rank 0's files never arrived
    (tmp_path / "final").mkdir()  # the final export is not a resume point
    assert newest_complete_checkpoint(str(tmp_path)) == (2, two)
    (tmp_path / "checkpoint_step000003" / f"{UPLOADED_MARK}1").touch()
    assert newest_complete_checkpoint(str(tmp_path))[0] == 3


def _key(**over) -> dict:
    key = {"stage": "sft", "stage_hash": "h1", "output_dir": "/out/a", "plan": {"total": 9}}
    return {**key, **over}


def _checkpoint(root, step: int) -> None:
    import json

    from deita_ray.training.loop import TRAINER_STATE, UPLOADED_MARK

    folder = root / f"checkpoint_step{step:06d}"
    folder.mkdir(parents=True)
    (folder / TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": 1}))
    (folder / f"{UPLOADED_MARK}0").touch()


def test_checkpoints_are_kept_for_the_same_settings_and_dropped_on_a_change(tmp_path):
    """A re-run of the stage with the same config hash, output folder and step plan resumes
    from what the last run left; any change (or a run outside the pipeline, key None) starts
    from an empty folder; another job's checkpoints are never deleted."""
    import pytest

    from deita_ray.training.loop import RUN_KEY, prepare_checkpoint_root

    root = tmp_path / "checkpoints" / "sft"
    assert prepare_checkpoint_root(str(root), _key()) is None  # first run: nothing to resume
    assert (root / RUN_KEY).exists()
    _checkpoint(root, 2)
    _checkpoint(root, 4)
    found = prepare_checkpoint_root(str(root), _key())
    assert found == (4, str(root / "checkpoint_step000004"))
    assert prepare_checkpoint_root(str(root), _key(plan={"total": 12})) is None  # other plan
    assert sorted(p.name for p in root.iterdir()) == [RUN_KEY]
    _checkpoint(root, 2)
    assert prepare_checkpoint_root(str(root), _key(stage_hash="h2")) is None  # config changed
    assert not (root / "checkpoint_step000002").exists()
    _checkpoint(root, 2)
    assert prepare_checkpoint_root(str(root), None) is None  # outside the pipeline: afresh
    assert list(root.iterdir()) == []
    prepare_checkpoint_root(str(root), _key())
    _checkpoint(root, 2)
    with pytest.raises(RuntimeError, match="/out/a.*own checkpoint_dir"):
        prepare_checkpoint_root(str(root), _key(output_dir="/out/b"))
    assert (root / "checkpoint_step000002").exists()  # the other job's: untouched


def test_checkpoint_root_is_on_the_jobs_storage(tmp_path):
    from deita_ray.config import TrainingConfig
    from deita_ray.training.loop import checkpoint_root

    out = str(tmp_path / "out")
    assert checkpoint_root(TrainingConfig(), out, "sft") == str(tmp_path / "out/checkpoints/sft")
    scratch = TrainingConfig(checkpoint_dir=str(tmp_path / "scratch"))
    assert checkpoint_root(scratch, out, "dpo") == str(tmp_path / "scratch/dpo")


def test_a_worker_takes_its_accelerator_from_its_own_use_gpu(monkeypatch):
    """Whatever the job's environment says (here DS_ACCELERATOR=cpu, as the old job-wide default
    did), a CPU worker makes DeepSpeed use the CPU, and a GPU worker that sees no GPU stops with
    a message instead of building a CPU engine."""
    import pytest
    import torch

    from deita_ray.training.loop import select_accelerator

    assert not torch.cuda.is_available()  # this machine: no GPU
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert select_accelerator(False) == "cpu"
    import os

    assert os.environ["DS_ACCELERATOR"] == "cpu"
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(RuntimeError, match="use_gpu: true.*sees no CUDA GPU"):
        select_accelerator(True)


def test_gpu_trainer_workers_get_cuda_from_a_driver_without_gpu(ray_local, tiny_llama, tmp_path):
    """On KubeRay the driver runs on a CPU-only head. The job's runtime env (what init_ray gives
    every worker) carries no DS_ACCELERATOR; the trainer built for use_gpu: true gives its
    workers DS_ACCELERATOR=cuda in their own runtime env, which wins over anything inherited
    (this test session's driver even exports DS_ACCELERATOR=cpu). The CPU trainer's get cpu."""
    import os

    import ray

    from deita_ray.config import RayConfig, TrainingConfig
    from deita_ray.runtime import DEFAULT_WORKER_ENV, has_cuda, worker_env
    from deita_ray.stages.sft import sft_step
    from deita_ray.training.loop import build_trainer
    from deita_ray.training.plan import plan_steps

    assert not has_cuda()
    assert "DS_ACCELERATOR" not in worker_env(RayConfig(), num_threads=2)
    assert "DS_ACCELERATOR" not in DEFAULT_WORKER_ENV
    assert os.environ.get("DS_ACCELERATOR") == "cpu"  # tests/conftest.py: the inherited value

    ds = ray.data.from_items([{"input_ids": [1, 2], "labels": [1, 2]}] * 8)

    @ray.remote(num_cpus=0)
    def seen_by_a_worker() -> str | None:
        return os.environ.get("DS_ACCELERATOR")

    for use_gpu, want in ((True, "cuda"), (False, "cpu")):
        t = TrainingConfig(use_gpu=use_gpu, num_workers=2, micro_batch_size=1)
        t.global_batch_size = 2
        trainer = build_trainer(
            sft_step, t, str(tiny_llama), ds, plan_steps(8, t), str(tmp_path / "ck" / "sft")
        )
        assert trainer.train_loop_config["use_gpu"] is use_gpu
        assert trainer.scaling_config.use_gpu is use_gpu
        assert trainer.scaling_config.resources_per_worker.get("GPU", 0) == int(use_gpu)
        env = trainer.run_config.worker_runtime_env
        assert env["env_vars"]["DS_ACCELERATOR"] == want
        assert ray.get(seen_by_a_worker.options(runtime_env=env).remote()) == want
        assert (trainer.run_config.storage_path, trainer.run_config.name) == (
            str(tmp_path / "ck"),
            "sft",
        )


def test_where_checkpoints_are_kept_is_not_in_the_training_stages_hash():
    """A re-run that only moves checkpoints or keeps more of them resumes (same hash); a
    setting that changes what is computed starts training over (another hash)."""
    from deita_ray.config import PipelineConfig
    from deita_ray.stages import dpo, sft

    for stage in (sft.STAGE, dpo.STAGE):
        cfg, moved = PipelineConfig(), PipelineConfig()
        t = getattr(moved, stage.name)
        t.keep_checkpoints, t.checkpoint_dir = 3, "/mnt/scratch/ckpt"
        t.custom_resources = {"trainer_node": 1}
        assert stage.depends_on(moved) == stage.depends_on(cfg), stage.name
        getattr(moved, stage.name).learning_rate = 1e-3
        assert stage.depends_on(moved) != stage.depends_on(cfg), stage.name

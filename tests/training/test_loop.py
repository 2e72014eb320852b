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

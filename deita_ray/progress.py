"""Live progress of a running stage: a counter actor the workers report to, and the lines the
driver logs from it (docs/README.md#the-console).

While a model stage runs, the pipeline (:class:`deita_ray.pipeline.StageProgress`) starts one
:class:`ProgressCounter` actor on the driver's node and makes it the stage's counter
(:func:`current_counter`). The stage hands it to its batch callables (score, embed, eval),
which call :func:`count_rows` after each batch, and to its training workers (sft, dpo), whose
rank 0 calls ``step.remote`` after each optimizer step: fire and forget, one small message per
batch or step. The driver polls :meth:`ProgressCounter.poll` and logs

- ``stage score: loading model (45 s)`` until the first batch (or step) is done;
- ``stage score: 1200/5000 rows (24.0%), 9.5 rows/s, ETA 6.7 min`` every
  ``output.progress_every_s`` seconds (eval: per metric pass, ``stage eval: alpaca/likelihood:
  ...``);
- ``stage sft: step 10/24 (41.7%), loss 1.2345, lr 4.50e-05, 812 tokens/s, ETA 3.2 min`` for
  step 1, every ``output.progress_every_steps``-th step and the last one.

Nothing here imports Ray or anything heavy: the module is imported by the workers too.
"""

from __future__ import annotations

import time
from typing import Any

_CURRENT: Any = None
"""The running stage's counter actor (driver side), or None."""


def current_counter() -> Any:
    """The running stage's :class:`ProgressCounter` actor handle, or None (no live progress:
    a stage run outside the pipeline, or progress lines turned off)."""
    return _CURRENT


def set_current(handle: Any) -> None:
    """Make ``handle`` the counter :func:`current_counter` returns (None: no counter)."""
    global _CURRENT
    _CURRENT = handle


def count_rows(progress: Any, rows: int) -> None:
    """Tell the stage's counter that a batch of ``rows`` rows is done (fire and forget; a
    ``progress`` of None does nothing)."""
    if progress is not None:
        progress.add.remote(int(rows))


def begin_phase(progress: Any, label: str, total: int, done: int = 0) -> Any:
    """Open a phase of its own on the stage's counter (eval: one per metric pass), waiting
    until the counter has it so no batch is counted in the phase before. Returns ``progress``,
    or None when there is no counter or it does not answer (progress never stops a job)."""
    if progress is None:
        return None
    try:
        import ray  # noqa: PLC0415 - only on the driver, with a counter

        ray.get(progress.begin.remote(label, int(total), int(done)), timeout=60)
        return progress
    except Exception:  # noqa: BLE001 - the pass runs without progress lines
        return None


class ProgressCounter:
    """Per-batch and per-step counts of one stage (a zero-CPU Ray actor on the driver's node,
    :func:`deita_ray.runtime.driver_side_actor`).

    Rows: :meth:`begin` opens a phase (eval: one per metric pass) with its own total; :meth:`add`
    counts a finished batch. Steps: :meth:`step` takes a training step's record, keeping the
    latest one and, for the driver to log, step 1, every ``every_steps``-th and the last.
    Batches that Ray retries after a failure are counted again; the driver caps at the total.
    """

    def __init__(self, every_steps: int = 0) -> None:
        self.every_steps = int(every_steps)
        self.t_start = time.monotonic()
        self.begin(None, None)
        self.pending: list[dict] = []
        self.last_step: dict | None = None
        self._first_step: tuple[int, float] | None = None

    def begin(self, label: str | None, total: int | None, done: int = 0) -> None:
        """Start a phase: ``total`` rows of which ``done`` were finished earlier (resume)."""
        self.label, self.total, self.done_before = label, total, int(done)
        self.rows = self.batches = 0
        self.t_begin = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, rows) when the first batch ended
        self.t_last = self.t_begin

    def add(self, rows: int) -> None:
        now = time.monotonic()
        self.rows += int(rows)
        self.batches += 1
        if self.first is None:
            self.first = (now, self.rows)
        self.t_last = now

    def step(self, rec: dict, total_steps: int) -> None:
        """A finished optimizer step: ``rec`` has ``step``, ``loss``, ``lr``,
        ``tokens_per_s``, ``seconds`` (the training loop's history record)."""
        now = time.monotonic()
        n = int(rec["step"])
        if self._first_step is None or self.last_step is None or n <= self.last_step["step"]:
            self._first_step = (n, now)  # the first step, or a worker group restarted
        first_n, first_t = self._first_step
        per_step = (now - first_t) / (n - first_n) if n > first_n else rec.get("seconds")
        eta = (total_steps - n) * per_step if per_step is not None else None
        out = {
            "step": n,
            "total": int(total_steps),
            "loss": rec.get("loss"),
            "lr": rec.get("lr"),
            "tokens_per_s": rec.get("tokens_per_s"),
            "eta_s": eta,
        }
        self.last_step = out
        every = self.every_steps
        if every > 0 and (n == 1 or n % every == 0 or n == total_steps):
            self.pending.append(out)

    def poll(self) -> dict:
        """The counts so far, and the step records to log since the last poll."""
        now = time.monotonic()
        rate = None
        if self.first is not None:
            t0, r0 = self.first
            if self.t_last > t0 and self.rows > r0:
                rate = (self.rows - r0) / (self.t_last - t0)
            else:  # one batch so far: its rows over the time since the phase began (loading
                # included: no ETA from it)
                rate = self.rows / max(t0 - self.t_begin, 1e-9)
        steps, self.pending = self.pending, []
        return {
            "label": self.label,
            "total": self.total,
            "done_before": self.done_before,
            "rows": self.rows,
            "batches": self.batches,
            "started": self.first is not None or self.last_step is not None,
            "waited_s": now - (self.t_begin if self.label is not None else self.t_start),
            "rows_per_s": rate,
            "steps": steps,
        }


def duration(seconds: float) -> str:
    """``45 s``, ``6.7 min``, ``2.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def rows_line(stage: str, snap: dict, total: int | None, done_before: int = 0) -> str:
    """The line of a rows snapshot (:meth:`ProgressCounter.poll`): ``total`` and
    ``done_before`` apply when the snapshot has no phase of its own."""
    head = f"stage {stage}: " + (f"{snap['label']}: " if snap["label"] is not None else "")
    if snap["label"] is not None:
        total, done_before = snap["total"], snap["done_before"]
    if not snap["started"]:
        return f"{head}loading model ({duration(snap['waited_s'])})"
    done = done_before + snap["rows"]
    rate = snap["rows_per_s"] or 0.0
    if not total:
        return f"{head}{done} rows, {rate:.1f} rows/s"
    done = min(done, total)
    line = f"{head}{done}/{total} rows ({100.0 * done / total:.1f}%), {rate:.1f} rows/s"
    if rate > 0 and snap["batches"] > 1:
        line += f", ETA {duration((total - done) / rate)}"
    return line


def step_line(stage: str, rec: dict) -> str:
    """The line of one training step record (:meth:`ProgressCounter.step`)."""
    n, total = rec["step"], rec["total"]
    parts = [f"stage {stage}: step {n}/{total} ({100.0 * n / max(total, 1):.1f}%)"]
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    if rec.get("lr") is not None:
        parts.append(f"lr {rec['lr']:.2e}")
    if rec.get("tokens_per_s") is not None:
        parts.append(f"{rec['tokens_per_s']:.0f} tokens/s")
    if rec.get("eta_s") is not None:
        parts.append(f"ETA {duration(rec['eta_s'])}")
    return ", ".join(parts)

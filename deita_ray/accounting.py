"""Row accounting: every stage reports rows in = rows out + rows rejected (by reason)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StageCounts:
    """What one stage did to its rows.

    Attributes:
        rows_in: rows the stage read.
        rows_out: rows it wrote to ``<output.dir>/<stage>/``.
        rejected_by_reason: rows it wrote to ``<output.dir>/rejects/<stage>/``, per reason.
    """

    rows_in: int = 0
    rows_out: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.rows_out + self.rows_rejected

    def check(self, stage: str) -> None:
        """Raise if rows went missing: in must equal out + rejected."""
        if not self.balanced:
            raise RuntimeError(
                f"stage {stage}: row accounting broken: in={self.rows_in} != "
                f"out={self.rows_out} + rejected={self.rows_rejected} {self.rejected_by_reason}"
            )

    def to_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
        }

    @staticmethod
    def merge_reasons(*counters: dict[str, int]) -> dict[str, int]:
        total: Counter = Counter()
        for c in counters:
            total.update(c)
        return dict(total)


class FailureBudgetExceeded(RuntimeError):
    """A stage rejected more rows than its failure budget allows (a systematic failure)."""

    def __init__(self, stage: str, reason: str | None, rejected: int, rows_in: int, limit: float):
        self.stage, self.reason = stage, reason
        self.rejected, self.rows_in, self.limit = rejected, rows_in, limit
        what = f"for reason '{reason}'" if reason else "in all"
        super().__init__(
            f"stage {stage}: {rejected} of {rows_in} rows rejected {what} "
            f"({rejected / rows_in:.1%}), over the failure budget of {limit:.1%}"
        )


def over_budget(
    stage: str,
    counts: StageCounts,
    max_fraction: float,
    reason_limits: dict[str, float],
    min_rows: int = 0,
) -> FailureBudgetExceeded | None:
    """The first budget ``counts`` exceeds (per reason first, then in all), or None.

    Args:
        stage: the stage's name (for the message).
        counts: the stage's accounting.
        max_fraction: largest share of rows_in rejected for all reasons together.
        reason_limits: largest share per named reason.
        min_rows: below this many input rows no fraction applies.
    """
    n = counts.rows_in
    if n == 0 or n < min_rows:
        return None
    for reason, limit in sorted(reason_limits.items()):
        k = counts.rejected_by_reason.get(reason, 0)
        if k > limit * n:
            return FailureBudgetExceeded(stage, reason, k, n, limit)
    if counts.rows_rejected > max_fraction * n:
        return FailureBudgetExceeded(stage, None, counts.rows_rejected, n, max_fraction)
    return None


@dataclass
class StageResult:
    """What a stage function returns to the pipeline.

    Attributes:
        counts: row accounting of the stage.
        metrics: JSON-able stage statistics for report.json (e.g. score summaries, selection
            statistics, training losses).
    """

    counts: StageCounts
    metrics: dict = field(default_factory=dict)

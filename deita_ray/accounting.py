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

"""Row accounting: every stage reports rows in = rows out + rows rejected (by reason).

A selecting stage (``select``) also has rows it read and did not pick: they are not rejects
(nothing is wrong with them, nothing goes to ``rejects/``) and are counted apart, by reason, as
*not selected*: rows in = rows out + rejected + not selected."""

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
        not_selected_by_reason: rows a selecting stage read and did not pick, per reason
            (``similar_to_selected``, ``not_reached``, ...); None for a stage that does not
            select (then its dict has no not-selected keys).
    """

    rows_in: int = 0
    rows_out: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    not_selected_by_reason: dict[str, int] | None = None

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    @property
    def rows_not_selected(self) -> int:
        return sum((self.not_selected_by_reason or {}).values())

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.rows_out + self.rows_rejected + self.rows_not_selected

    def check(self, stage: str) -> None:
        """Raise if rows went missing: in must equal out + rejected (+ not selected)."""
        if not self.balanced:
            not_selected = (
                f" + not selected={self.rows_not_selected} {self.not_selected_by_reason}"
                if self.not_selected_by_reason is not None
                else ""
            )
            raise RuntimeError(
                f"stage {stage}: row accounting broken: in={self.rows_in} != "
                f"out={self.rows_out} + rejected={self.rows_rejected} {self.rejected_by_reason}"
                f"{not_selected}"
            )

    def to_dict(self) -> dict:
        out = {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_rejected": self.rows_rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
        }
        if self.not_selected_by_reason is not None:
            out["rows_not_selected"] = self.rows_not_selected
            out["not_selected_by_reason"] = dict(sorted(self.not_selected_by_reason.items()))
        return out

    @staticmethod
    def merge_reasons(*counters: dict[str, int]) -> dict[str, int]:
        total: Counter = Counter()
        for c in counters:
            total.update(c)
        return dict(total)


def current_entry(entry: dict, selects: bool) -> dict:
    """A stage's entry of ``report.json`` / ``manifest.json`` in this version's words.

    Versions before ``not_selected`` counted the rows a selecting stage (``Stage.selects``)
    did not pick as ``rows_rejected`` / ``rejected_by_reason``; such an entry (a finished stage
    that a later run skips or reports again) gets them moved to ``rows_not_selected`` /
    ``not_selected_by_reason``. Any other entry is returned as it is.
    """
    if not selects or "not_selected_by_reason" in entry:
        return entry
    if "rejected_by_reason" not in entry:
        return entry
    out = dict(entry)
    reasons = dict(out.get("rejected_by_reason") or {})
    out.update(
        rows_rejected=0,
        rejected_by_reason={},
        rows_not_selected=sum(reasons.values()),
        not_selected_by_reason=reasons,
    )
    return out


def done_line(stage: str, seconds: float, entry: dict) -> str:
    """The console line of a finished stage, e.g. ``stage select: done in 1.2s: in=276
    out=64 rejected=0 not_selected=212 {'not_reached': 190, 'similar_to_selected': 22}``."""
    line = (
        f"stage {stage}: done in {seconds:.1f}s: in={entry['rows_in']} out={entry['rows_out']} "
        f"rejected={entry['rows_rejected']}"
    )
    if entry["rejected_by_reason"]:
        line += f" {entry['rejected_by_reason']}"
    if "not_selected_by_reason" in entry:
        line += f" not_selected={entry['rows_not_selected']}"
        if entry["not_selected_by_reason"]:
            line += f" {entry['not_selected_by_reason']}"
    return line


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

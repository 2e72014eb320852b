"""Each stage's section of the job report, keyed by stage name (:data:`SECTIONS`).

A section (:class:`~deita_ray.report.section.StageReport`) is the code that knows one stage's
finished outputs: its per-row facts, its texts, its statistics and plots. The stages do not
import it; :mod:`deita_ray.report.assembly` looks a stage's section up by name. A stage without
one (sft, dpo, export) contributes its recorded result only. See docs/report.md.

- :mod:`.canonical`: the facts of a stage that writes canonical rows (ingest's section);
- :mod:`.score`: score distributions, the pool vs the selection;
- :mod:`.select`: what was picked, why the rest was not, what tau does;
- :mod:`.eval`: the eval metrics of each model.
"""

from __future__ import annotations

from deita_ray.report.section import StageReport
from deita_ray.report.sections import eval as eval_section
from deita_ray.report.sections import score, select
from deita_ray.report.sections.canonical import canonical_report

SECTIONS: dict[str, StageReport] = {
    "ingest": canonical_report("ingest"),
    "score": score.REPORT,
    "select": select.REPORT,
    "eval": eval_section.REPORT,
}
"""Stage name -> its section of the report (stages not listed have none)."""

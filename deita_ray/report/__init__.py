"""The job report: ``report.json``, the PNG plots and ``report.html`` of a job's output folder,
built from the finished stages' outputs (docs/report.md). It runs no stage, and no stage
imports it: the pipeline calls :func:`write_report` at the end of a job, and
``python -m deita_ray.report DIR`` rebuilds it later.

- :mod:`~deita_ray.report.assembly`: assembles report.json from the sections (and the CLI);
- :mod:`~deita_ray.report.section`: what a stage's section gives and may read, and the
  helpers the sections share to read outputs;
- :mod:`~deita_ray.report.sections`: one section per stage that has one, keyed by stage name;
- :mod:`~deita_ray.report.plots`: figures, colours, the training-loss plot;
- :mod:`~deita_ray.report.html`: report.html: the sample rule and the page's data;
- :mod:`~deita_ray.report.page`: the page itself (HTML, CSS, the browser's script).
"""

from deita_ray.report.assembly import rebuild, write_report

__all__ = ["rebuild", "write_report"]

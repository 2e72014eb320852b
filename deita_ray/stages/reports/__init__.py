"""Each stage's share of the job report (a :class:`~deita_ray.reporting.StageReport` that the
stage's descriptor points to): the code that knows the stage's outputs, kept beside it so
that :mod:`deita_ray.report` names no stage. See docs/report.md."""

"""What a user sees on the console of ``python -m deita_ray.pipeline`` when it is not a terminal
(``ray job submit``, CI, a log file): the stages' starts, their progress, their ends and the
summary; none of Ray's own chatter (worker and actor log lines, Ray Data's progress tables),
which stays in the session's log files."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.slow

# A line that Ray forwards from a worker, actor, raylet or GCS process to the driver's console:
# "(MapWorker(MapBatches(ModelScorers)) pid=123) ...", "(raylet) ...", possibly colour-coded.
WORKER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*\((?:[^\n]*pid=\d+|raylet|gcs_server)[^\n]*\)")
STAGES = ("ingest", "score", "embed", "select", "sft")


def test_console_shows_the_job_and_none_of_rays_chatter(reference_run):
    console = reference_run.stdout + reference_run.stderr
    lines = console.splitlines()
    chatter = [line for line in lines if WORKER_LINE.search(line)]
    assert chatter == [], "\n".join(chatter[:20])
    failing = sum("Failed to query Ray Train Controller" in line for line in lines)
    assert failing == 0
    # Ray Data's non-terminal progress tables ("======= Running Dataset: ...", every 10 s)
    # and its INFO lines stay in logs/ray-data/ray-data.log.
    assert not [line for line in lines if "Running Dataset" in line or "Execution plan" in line]

    for stage in STAGES:
        assert re.search(rf"deita_ray INFO stage {stage}: running$", console, re.M), stage
        assert re.search(rf"deita_ray INFO stage {stage}: done in \S+s: in=\d+", console), stage
    # Progress of the stages that write part by part: "stage score: 40/116 rows (34.5%), ..."
    total = re.search(r"stage score: done in \S+s: in=(\d+)", console).group(1)
    assert re.search(rf"stage score: \d+/{total} rows \(\d+\.\d%\), \d+\.\d rows/s", console)
    assert re.search(r"stage ingest: \d+ rows, \d+\.\d rows/s", console)
    assert "Ray's own logs: " in console  # where the chatter went

    # The summary on stdout is the job's result as JSON.
    summary = json.loads(reference_run.stdout[reference_run.stdout.index("{") :])
    assert set(summary["stages"]) == set(STAGES)
    assert summary["stages"]["sft"]["rows_out"] > 0

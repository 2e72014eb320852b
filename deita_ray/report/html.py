"""``report.html``: the job report as one self-contained page, with a browser of the rows.

One file, no server, no network: CSS and JavaScript inline, the plots embedded as base64 PNG,
the data as JSON inside ``<script type="application/json">`` (every ``<``, ``>`` and ``&`` in
it written as a ``\\u`` escape, so no text of a row can close the element). The page builds
every element with ``textContent``, never from markup, so a row containing ``<script>`` shows
as text. Copy the output folder anywhere and open the file.

What the browser holds (docs/report.md, "Sampling rule") so the page stays usable at any pool
size (about 14 MB for 100K rows, see README):

- every selected row in rank order, up to :data:`MAX_SELECTED` (the first by rank beyond);
- for every other status, a fixed-seed (:data:`SAMPLE_SEED`) sample of up to
  :data:`PER_STATUS` rows, and every selected row that rejected one of them;
- the :data:`TOP_BOTTOM` best and worst rows by the row score (whatever their status);
- per stage and reject reason, the first :data:`REJECTS_PER_REASON` rejects with their raw
  text;
- each message's text cut at :data:`MESSAGE_CHARS` characters and a row's at
  :data:`ROW_CHARS` (later messages left out), a reject's raw text at :data:`RAW_CHARS` (the
  page says how much was cut), so the page holds at most about 15K rows x 4K characters.

Counts (per status, per source file, per stage and reason) always cover every row.
"""

from __future__ import annotations

import base64
import datetime
import glob
import html
import json
import math
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_ray.data.rejects import REJECTS_SCHEMA
from deita_ray.data.sink import parquet_files, stage_dir
from deita_ray.report.section import NOT_SCORES, SELECTED, read_json, score_columns, to_numpy

if TYPE_CHECKING:
    from deita_ray.report.assembly import Assembled

HTML_FILE = "report.html"
MAX_SELECTED = 10_000
PER_STATUS = 1_000
TOP_BOTTOM = 100
REJECTS_PER_REASON = 100
MESSAGE_CHARS = 1_500
ROW_CHARS = 4_000
RAW_CHARS = 2_000
SAMPLE_SEED = 0
POOL_STATUS = "pool"
"""Status of the rows of a job that has not selected (no stage gave them a status)."""
REJECTED = "rejected"
"""Status of the rejects in the browser (with their stage and reason)."""
STUDY_JSON, STUDY_MD = "study.json", "study.md"
DIGITS = 4
"""Decimals kept of scores and cosines in the page (report.json keeps full precision)."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def _num(value: Any) -> Any:
    """A finite number rounded to :data:`DIGITS` decimals (lists element-wise), else None."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_num(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    value = float(value)
    return round(value, DIGITS) if math.isfinite(value) else None


def _cut(text: str | None, limit: int) -> tuple[str, int]:
    """(the first ``limit`` characters, how many were cut)."""
    if text is None:
        return "", 0
    return (text[:limit], len(text) - limit) if len(text) > limit else (text, 0)


def _messages(value: Any) -> tuple[list[list] | None, list[int] | None]:
    """``[[role, content, characters cut], ...]`` of a canonical messages value, each message
    cut at :data:`MESSAGE_CHARS` and the row at :data:`ROW_CHARS`; and ``[messages, characters]``
    left out at the end of the row (None when none)."""
    if value is None:
        return None, None
    out: list[list] = []
    left = ROW_CHARS
    hidden = [0, 0]
    for m in value:
        content = m.get("content") or ""
        if left <= 0:
            hidden[0] += 1
            hidden[1] += len(content)
            continue
        text, cut = _cut(content, min(MESSAGE_CHARS, left))
        left -= len(text)
        out.append([m.get("role") or "", text, cut])
    return out, (hidden if hidden[0] else None)


def _png(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
    except OSError:
        return None


def script_json(payload: Any) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>``, ``&`` (which occur only inside
    strings) and the two JavaScript line separators written as ``\\u`` escapes."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (
        ("&", "\\u0026"),
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


# ---------------------------------------------------------------------------------------------
# Sampling


def row_status(rows: pa.Table) -> np.ndarray:
    """Status per row as a numpy object array (:data:`POOL_STATUS` where none is known)."""
    if "status" not in rows.column_names:
        return np.full(rows.num_rows, POOL_STATUS, dtype=object)
    status = pc.fill_null(rows["status"], POOL_STATUS)
    return np.asarray(status.to_pylist(), dtype=object)


def sample_positions(rows: pa.Table, row_score: str | None) -> tuple[np.ndarray, dict]:
    """Positions of the rows the browser holds (the rule of the module docstring), and per
    status ``{"total", "shown"}``."""
    n = rows.num_rows
    status = row_status(rows)
    keep = np.zeros(n, dtype=bool)
    totals = Counter(status.tolist())
    selected = np.flatnonzero(status == SELECTED)
    if len(selected) and "rank" in rows.column_names:
        rank = to_numpy(rows["rank"])[selected]
        selected = selected[np.argsort(np.nan_to_num(rank, nan=np.inf), kind="stable")]
    keep[selected[:MAX_SELECTED]] = True
    for name in sorted(s for s in totals if s != SELECTED):
        pos = np.flatnonzero(status == name)
        if len(pos) > PER_STATUS:
            rng = np.random.default_rng(SAMPLE_SEED)
            pos = np.sort(rng.choice(pos, PER_STATUS, replace=False))
        keep[pos] = True
    if row_score is not None:
        score = to_numpy(rows[row_score])
        finite = np.flatnonzero(np.isfinite(score))
        order = finite[np.argsort(-score[finite], kind="stable")]
        keep[order[:TOP_BOTTOM]] = True
        keep[order[-TOP_BOTTOM:]] = True
    if "rejected_by" in rows.column_names:
        # The selected row that rejected a shown row is shown too (side by side).
        by = pc.drop_null(rows["rejected_by"].filter(pa.array(keep)))
        at = pc.drop_null(pc.index_in(by, value_set=rows["id"]))
        keep[at.to_numpy(zero_copy_only=False)] = True
    shown = Counter(status[keep].tolist())
    names = sorted(totals, key=lambda s: (s != SELECTED, -totals[s], s))  # selected first
    facts = {s: {"total": int(totals[s]), "shown": int(shown[s])} for s in names}
    return np.flatnonzero(keep), facts


def _texts(built: Assembled, ids: list[str]) -> dict[str, Any]:
    """``messages`` of ``ids``, asked of every stage that has texts, in order, until found."""
    found: dict[str, Any] = {}
    for _, rep in built.sections:
        if rep.texts is None:
            continue
        missing = [i for i in ids if i not in found]
        if not missing:
            break
        table = rep.texts(built.context, missing)
        if table is None:
            continue
        for i, m in zip(table["id"].to_pylist(), table["messages"].to_pylist(), strict=True):
            found.setdefault(i, m)
    return found


def browser_rows(built: Assembled) -> tuple[dict[str, list], dict, list[str]]:
    """The sampled rows, column by column, their status facts and the score columns."""
    rows = built.context.rows
    cols: dict[str, list] = {
        k: []
        for k in (
            "id",
            "status",
            "rank",
            "source",
            "rejected_by",
            "cosine",
            "max_sim",
            "messages",
            "hidden",
            "stage",
            "reason",
            "detail",
            "raw",
            "range",
        )
    }
    cols["scores"] = []
    if rows is None:
        return cols, {}, []
    per_row, per_turn = score_columns(rows.schema)
    score_names = [c for c in (*per_row, *per_turn) if c not in NOT_SCORES]
    positions, facts = sample_positions(rows, built.row_score)
    table = rows.take(pa.array(positions, pa.int64()))
    status = row_status(table).tolist()
    ids = table["id"].to_pylist()
    texts = _texts(built, ids)

    def column(name: str) -> list:
        return table[name].to_pylist() if name in table.column_names else [None] * len(ids)

    cols["id"] = ids
    cols["status"] = status
    cols["rank"] = column("rank")
    cols["source"] = column("source")
    cols["rejected_by"] = column("rejected_by")
    cols["cosine"] = [_num(v) for v in column("cosine")]
    cols["max_sim"] = [_num(v) for v in column("max_sim")]
    shown = [_messages(texts.get(i)) for i in ids]
    cols["messages"] = [m for m, _ in shown]
    cols["hidden"] = [h for _, h in shown]
    scores = {name: [_num(v) for v in column(name)] for name in score_names}
    cols["scores"] = [
        {k: v[j] for k, v in scores.items() if v[j] is not None} for j in range(len(ids))
    ]
    for k in ("stage", "reason", "detail", "raw", "range"):
        cols[k] = [None] * len(ids)
    return cols, facts, score_names


def _reject_folders(out_dir: str, order: list[str]) -> list[str]:
    root = os.path.join(out_dir, "rejects")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))]
    rank = {n: i for i, n in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def read_rejects(out_dir: str, order: list[str]) -> tuple[list[dict], list[dict], Counter]:
    """Per stage and reason, the first :data:`REJECTS_PER_REASON` rejects (raw text cut), the
    count of every (stage, reason) with how many are shown, and the reject count per
    (source, stage)."""
    kept: list[dict] = []
    counts: Counter = Counter()
    by_source: Counter = Counter()
    wanted = [f.name for f in REJECTS_SCHEMA]
    for folder in _reject_folders(out_dir, order):
        for path in parquet_files(os.path.join(out_dir, "rejects", folder)):
            pf = pq.ParquetFile(path)
            cols = [c for c in wanted if c in pf.schema_arrow.names]
            if "reason" not in cols:
                continue
            for batch in pf.iter_batches(batch_size=4096, columns=cols):
                data = batch.to_pydict()
                n = batch.num_rows
                for j in range(n):
                    stage = (data.get("stage") or [None] * n)[j] or folder
                    reason = data["reason"][j] or "unknown"
                    source = (data.get("source") or [None] * n)[j] or ""
                    counts[(stage, reason)] += 1
                    by_source[(source, stage)] += 1
                    if counts[(stage, reason)] <= REJECTS_PER_REASON:
                        raw, cut = _cut((data.get("raw") or [None] * n)[j], RAW_CHARS)
                        kept.append(
                            {
                                "id": (data.get("id") or [None] * n)[j],
                                "stage": stage,
                                "reason": reason,
                                "detail": (data.get("detail") or [None] * n)[j],
                                "raw": [raw, cut],
                                "source": source or None,
                                "range": [
                                    (data.get(k) or [None] * n)[j]
                                    for k in ("range_start", "range_end", "range_unit")
                                ],
                            }
                        )
    summary = [
        {
            "stage": s,
            "reason": r,
            "total": c,
            "shown": min(c, REJECTS_PER_REASON),
        }
        for (s, r), c in counts.items()
    ]
    return kept, summary, by_source


def add_rejects(cols: dict[str, list], rejects: list[dict]) -> None:
    """Append the rejects to the browser's columns (status :data:`REJECTED`)."""
    for r in rejects:
        cols["id"].append(r["id"])
        cols["status"].append(REJECTED)
        cols["source"].append(r["source"])
        cols["stage"].append(r["stage"])
        cols["reason"].append(r["reason"])
        cols["detail"].append(r["detail"])
        cols["raw"].append(r["raw"])
        cols["range"].append(r["range"] if r["range"][0] is not None else None)
        for k in ("rank", "rejected_by", "cosine", "max_sim", "messages", "hidden"):
            cols[k].append(None)
        cols["scores"].append({})


# ---------------------------------------------------------------------------------------------
# Page sections


def source_table(rows: pa.Table | None, rejects_by_source: Counter) -> list[dict]:
    """Per source file: rows that reached the pool by status, and rejects by stage."""
    out: dict[str, dict] = {}
    if rows is not None and "source" in rows.column_names:
        status = pa.array(row_status(rows).tolist(), pa.string())
        t = pa.table({"source": pc.fill_null(rows["source"], ""), "status": status})
        # use_threads=False: see ingest._reduce_bucket (Ray Data resizes Arrow's CPU pool)
        g = t.group_by(["source", "status"], use_threads=False).aggregate([("status", "count")])
        for src, st, n in zip(
            g["source"].to_pylist(),
            g["status"].to_pylist(),
            g["status_count"].to_pylist(),
            strict=True,
        ):
            entry = out.setdefault(src, {"source": src, "rows": 0, "status": {}, "rejected": {}})
            entry["rows"] += n
            entry["status"][st] = n
    for (src, stage), n in rejects_by_source.items():
        entry = out.setdefault(src, {"source": src, "rows": 0, "status": {}, "rejected": {}})
        entry["rejected"][stage] = entry["rejected"].get(stage, 0) + n
    return sorted(
        out.values(), key=lambda e: (-(e["rows"] + sum(e["rejected"].values())), e["source"])
    )


def stage_table(out_dir: str, report: dict, built: Assembled) -> tuple[list[dict], list[str]]:
    """Per stage: what it did (the recorded result) and whether its outputs are there; and
    sentences about what is missing."""
    stages = report.get("stages") or {}
    manifest = read_json(os.path.join(out_dir, "manifest.json")) or {}
    configured = (manifest.get("config") or {}).get("stages")
    expected = list(configured) if isinstance(configured, list) else list(stages)
    names = [d.name for d in built.descriptors]
    names += [n for n in stages if n not in names]
    docs = {d.name: d.doc for d in built.descriptors}
    table, missing = [], []
    for name in names:
        result = stages.get(name)
        has_output = os.path.isdir(stage_dir(out_dir, name)) and bool(
            os.listdir(stage_dir(out_dir, name))
        )
        if result is None and not has_output and name not in expected:
            continue
        if result is None:
            state = "outputs only" if has_output else "missing"
            if not has_output:
                missing.append(
                    f"{name}: in this job's stages but it has no result and no output folder "
                    f"({name}/): not run yet, failed, or removed"
                )
        elif not has_output:
            state = "outputs missing"
            missing.append(
                f"{name}: finished, but its output folder ({name}/) is missing or empty: its "
                "statistics and plots are left out"
            )
        else:
            state = "earlier run" if result.get("earlier_run") or result.get("skipped") else "done"
        entry = {"name": name, "doc": docs.get(name, ""), "state": state}
        if result is not None:
            for k in (
                "rows_in",
                "rows_out",
                "rows_rejected",
                "rejected_by_reason",
                "rows_not_selected",
                "not_selected_by_reason",
                "seconds",
                "rows_per_s",
            ):
                entry[k] = result.get(k)
        table.append(entry)
    if not table:
        missing.append("no stage result and no stage output found in this folder")
    return table, missing


def format_value(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` places, None and non-finite as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def study_table(study: dict) -> dict:
    """A study's arms as ``{"columns", "rows"}`` of strings (the study.json of
    ``python -m deita_ray.study``: per arm method, status, selection, training, eval)."""
    arms = study.get("arms") if isinstance(study.get("arms"), dict) else {}
    comparisons = study.get("comparisons") if isinstance(study.get("comparisons"), dict) else {}
    metrics = [(s, m) for s, ms in comparisons.items() if isinstance(ms, dict) for m in ms]
    columns = ["arm", "method", "status", "selected", "mean evol score", "last loss"]
    for s, m in metrics:
        columns += [f"{s} {m} [95% CI]", f"{s} {m} vs random"]
    columns.append("wall s")
    rows = []
    for name, arm in arms.items():
        arm = arm if isinstance(arm, dict) else {}
        sel = arm.get("selection") or {}
        row = [
            name,
            format_value(arm.get("method")),
            format_value(arm.get("status")),
            format_value(sel.get("selected")),
            format_value(sel.get("mean_evol_score"), 2),
            format_value((arm.get("training") or {}).get("loss_last")),
        ]
        for s, m in metrics:
            value = ((arm.get("eval") or {}).get(s) or {}).get(m)
            if not isinstance(value, dict):
                row += ["–", "–"]
                continue
            ci = value.get("ci95") or [None, None]
            row.append(
                f"{format_value(value.get('value'))} [{format_value(ci[0])}, {format_value(ci[1])}]"
            )
            verdicts = (comparisons.get(s) or {}).get(m, {}).get("verdicts") or {}
            row.append(
                "(random)" if arm.get("method") == "random" else format_value(verdicts.get(name))
            )
        row.append(format_value((arm.get("seconds") or {}).get("wall"), 0))
        rows.append(row)
    return {"columns": columns, "rows": rows}


def study_section(out_dir: str) -> dict | None:
    """The study's table, its Markdown and its plots, when a study wrote this folder."""
    path = os.path.join(out_dir, STUDY_JSON)
    if not os.path.exists(path):
        return None
    study = read_json(path)
    section: dict[str, Any] = {"table": None, "markdown": None, "plots": []}
    if isinstance(study, dict):
        section["table"] = study_table(study)
    else:
        section["error"] = f"{STUDY_JSON} is not readable JSON"
    try:
        with open(os.path.join(out_dir, STUDY_MD), encoding="utf-8") as f:
            section["markdown"] = f.read()
    except OSError:
        pass
    for png in sorted(glob.glob(os.path.join(out_dir, "plots", "study_*.png"))):
        src = _png(png)
        if src:
            section["plots"].append({"name": os.path.basename(png), "src": src})
    return section


def _plots(out_dir: str, report: dict, built: Assembled) -> list[dict]:
    out = []
    for rel in report.get("plots") or []:
        src = _png(os.path.join(out_dir, rel))
        if src:
            out.append(
                {"name": os.path.basename(rel), "stage": built.plot_stage.get(rel, ""), "src": src}
            )
    return out


def payload(out_dir: str, report: dict, built: Assembled) -> dict:
    """Everything the page shows, as plain JSON values."""
    cols, status_facts, score_names = browser_rows(built)
    order = [d.name for d in built.descriptors]
    rejects, reject_summary, rejects_by_source = read_rejects(out_dir, order)
    add_rejects(cols, rejects)
    stages, missing = stage_table(out_dir, report, built)
    tau = (report.get("statistics") or {}).get("similarity", {}).get("tau")
    return {
        "title": os.path.basename(os.path.abspath(out_dir)),
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "notes": report.get("notes") or [],
        "stages": stages,
        "missing": missing,
        "statistics": report.get("statistics") or {},
        "plots": _plots(out_dir, report, built),
        "study": study_section(out_dir),
        "tau": tau,
        "row_score": built.row_score,
        "score_columns": score_names,
        "status_facts": status_facts,
        "reject_summary": reject_summary,
        "sources": source_table(built.context.rows, rejects_by_source),
        "rows": cols,
        "sampling": {
            "max_selected": MAX_SELECTED,
            "per_status": PER_STATUS,
            "top_bottom": TOP_BOTTOM,
            "rejects_per_reason": REJECTS_PER_REASON,
            "message_chars": MESSAGE_CHARS,
            "row_chars": ROW_CHARS,
            "raw_chars": RAW_CHARS,
            "seed": SAMPLE_SEED,
        },
    }


def render_html(out_dir: str, report: dict, built: Assembled) -> str:
    """The whole page."""
    from deita_ray.report.page import PAGE

    data = payload(out_dir, report, built)
    title = html.escape(f"deita_ray report: {data['title']}")
    head, tail = PAGE.split("__DATA__")  # the data goes in whole, untouched by other fills
    return head.replace("__TITLE__", title) + script_json(data) + tail

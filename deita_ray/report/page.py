"""The page of ``report.html``: markup, CSS and JavaScript, filled by :mod:`deita_ray.report.html`.

``__TITLE__`` (HTML-escaped by the caller) and ``__DATA__`` (the JSON payload, escaped for a
``<script>`` element) are the only fills. The script builds every element with
``createElement`` / ``textContent``; no string of the data is ever parsed as markup.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#dcdce0; --bg:#fafafa; --sel:#d62728;
        --dup:#b35c00; --rej:#7a1fa2; --ok:#1b7f3b; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: var(--bg); }
header { padding: 18px 28px 8px; background: #fff; border-bottom: 1px solid var(--line); }
header h1 { margin: 0 0 4px; font-size: 22px; }
nav { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid var(--line);
      padding: 6px 28px; display: flex; gap: 16px; flex-wrap: wrap; }
nav a { color: #0b57d0; text-decoration: none; }
main { padding: 0 28px 40px; max-width: 1500px; }
section { margin-top: 26px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
.muted { color: var(--muted); }
.warn { background: #fff4e5; border: 1px solid #f0c36d; padding: 8px 14px; border-radius: 6px; }
.warn ul { margin: 4px 0; padding-left: 20px; }
table { border-collapse: collapse; background: #fff; margin: 6px 0; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f3; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
.plots { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); padding: 6px; }
figure img { max-width: 100%; height: auto; display: block; }
figure figcaption { color: var(--muted); font-size: 12px; }
.controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: end; background: #fff;
            border: 1px solid var(--line); padding: 10px; border-radius: 6px; }
.controls label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
.controls input, .controls select { font: inherit; padding: 3px 6px; min-width: 90px; }
.presets { display: flex; gap: 6px; flex-wrap: wrap; margin: 8px 0; }
button { font: inherit; padding: 3px 10px; border: 1px solid var(--line); background: #fff;
         border-radius: 5px; cursor: pointer; }
button:hover { background: #eef3fd; }
.pager { display: flex; gap: 8px; align-items: center; margin: 8px 0; }
.row-card { background: #fff; border: 1px solid var(--line); border-radius: 6px; margin: 10px 0;
            padding: 8px 12px; }
.row-head { display: flex; gap: 12px; flex-wrap: wrap; align-items: baseline; }
.row-head .id { font-family: ui-monospace, Menlo, Consolas, monospace; font-weight: 600; }
.badge { font-size: 12px; padding: 1px 8px; border-radius: 10px; color: #fff; background: #777; }
.badge.selected { background: var(--sel); }
.badge.similar_to_selected { background: var(--dup); }
.badge.rejected { background: var(--rej); }
.badge.not_reached { background: #5c6bc0; }
.scores { color: var(--muted); font-size: 12px; margin: 2px 0 6px; }
.why { margin: 4px 0; font-weight: 600; color: var(--dup); }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.pair > div { min-width: 0; }
.pair h4 { margin: 4px 0; font-size: 13px; }
.msg { border-left: 3px solid #ccc; padding-left: 8px; margin: 4px 0; }
.msg.role-user { border-color: #1f77b4; }
.msg.role-assistant { border-color: #2ca02c; }
.msg.role-system { border-color: #9467bd; }
.msg .role { font-size: 11px; text-transform: uppercase; color: var(--muted); }
pre { white-space: pre-wrap; word-break: break-word; margin: 2px 0;
      font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace; max-height: 320px; overflow: auto; }
.cut { font-size: 12px; color: var(--muted); font-style: italic; }
details > summary { cursor: pointer; color: #0b57d0; }
</style>
</head>
<body>
<header><h1 id="title"></h1><div id="subtitle" class="muted"></div></header>
<nav>
  <a href="#summary">Summary</a><a href="#stages">Stages</a><a href="#plots">Plots</a>
  <a href="#study">Study</a><a href="#sources">Sources</a><a href="#rejects">Rejects</a>
  <a href="#browser">Rows</a><a href="#statistics">Statistics</a>
</nav>
<main>
<section id="summary"></section>
<section id="stages"><h2>Stages: rows in, out, rejected, not selected</h2></section>
<section id="plots"><h2>Plots</h2></section>
<section id="study"></section>
<section id="sources"><h2>Rows per source file</h2></section>
<section id="rejects"><h2>Rejects per stage and reason</h2></section>
<section id="browser"><h2>Rows</h2>
  <p id="sampling" class="muted"></p>
  <div class="presets" id="presets"></div>
  <div class="controls">
    <label>Status<select id="f-status"></select></label>
    <label>Source file<select id="f-source"></select></label>
    <label id="l-min">Score from<input id="f-min" type="number" step="any"></label>
    <label id="l-max">Score to<input id="f-max" type="number" step="any"></label>
    <label>Search text or id<input id="f-search" type="search" placeholder="words..."></label>
    <label>Order<select id="f-sort"></select></label>
  </div>
  <div class="pager"><button id="prev">&#8592; previous</button><span id="count"></span>
    <button id="next">next &#8594;</button></div>
  <div id="rows"></div>
  <div class="pager"><button id="prev2">&#8592; previous</button>
    <button id="next2">next &#8594;</button></div>
</section>
<section id="statistics"><h2>Statistics (report.json)</h2></section>
</main>
<script type="application/json" id="report-data">__DATA__</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const R = D.rows;
  const N = R.id.length;
  const PAGE_SIZE = 25;
  const byId = (id) => document.getElementById(id);

  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = String(v);
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2013";
    if (typeof v === "number") {
      if (!isFinite(v)) return "\u2013";
      if (Number.isInteger(v)) return v.toLocaleString("en-US");
      return Math.abs(v) >= 1000 ? v.toLocaleString("en-US", {maximumFractionDigits: 1})
                                 : String(+v.toPrecision(4));
    }
    if (typeof v === "boolean") return v ? "yes" : "no";
    return String(v);
  }
  function table(columns, rows, numeric) {
    return h("table", {}, h("thead", {}, h("tr", {}, columns.map((c) => h("th", {text: c})))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((cell, j) =>
        cell instanceof Node ? h("td", {}, cell)
          : h("td", {class: numeric && numeric[j] ? "num" : null, text: fmt(cell)}))))));
  }
  function value(v, depth) {
    if (v === null || v === undefined || typeof v !== "object") return fmt(v);
    if (Array.isArray(v)) {
      if (v.every((x) => x === null || typeof x !== "object")) return v.map(fmt).join(", ");
      if (v.every((x) => x && typeof x === "object" && !Array.isArray(x))) {
        const cols = [...new Set(v.flatMap((x) => Object.keys(x)))];
        return table(cols, v.map((x) => cols.map((c) => value(x[c], depth + 1))));
      }
      return h("div", {}, v.map((x) => h("div", {}, value(x, depth + 1))));
    }
    const entries = Object.entries(v);
    if (depth > 0 && entries.length === 0) return "\u2013";
    return h("table", {class: "kv"}, h("tbody", {}, entries.map(([k, x]) =>
      h("tr", {}, h("td", {text: k}), h("td", {}, value(x, depth + 1))))));
  }

  // ---- summary and stages
  byId("title").textContent = "deita_ray report: " + D.title;
  byId("subtitle").textContent = "generated " + D.generated + " \u00b7 " +
    fmt(R.id.length) + " rows held by this page (see Rows for the sampling rule)";
  const summary = byId("summary");
  summary.append(h("h2", {text: "Summary"}));
  const sel = D.status_facts && D.status_facts.selected;
  const totalPool = Object.values(D.status_facts || {}).reduce((a, f) => a + f.total, 0);
  const rejTotal = (D.reject_summary || []).reduce((a, r) => a + r.total, 0);
  summary.append(h("p", {},
    totalPool ? `${fmt(totalPool)} rows reached the pool` : "No row facts found",
    sel ? `; ${fmt(sel.total)} selected, ${fmt(totalPool - sel.total)} not selected` : "",
    `; ${fmt(rejTotal)} rejected by a stage.`,
    D.tau !== null && D.tau !== undefined ? ` Selection threshold tau = ${fmt(D.tau)}.` : ""));
  if (D.missing && D.missing.length) {
    summary.append(h("div", {class: "warn", id: "missing"}, h("strong", {text: "Missing: "}),
      "this report shows what exists.", h("ul", {}, D.missing.map((m) => h("li", {text: m})))));
  }
  if (D.notes && D.notes.length) {
    summary.append(h("ul", {}, D.notes.map((n) => h("li", {text: n}))));
  }
  const reasons = (r) => Object.entries(r || {}).map(([k, n]) =>
    `${k}: ${fmt(n)}`).join(", ") || "\u2013";
  // Rows a stage rejected (written to rejects/) and rows the select stage did not pick (not
  // rejects) are separate columns; "\u2013" where a stage does not select.
  const stageRows = D.stages.map((s) => [s.name, s.state, s.rows_in, s.rows_out,
    s.rows_rejected, reasons(s.rejected_by_reason),
    s.rows_not_selected === undefined || s.rows_not_selected === null ? "\u2013" : s.rows_not_selected,
    s.not_selected_by_reason ? reasons(s.not_selected_by_reason) : "\u2013",
    s.seconds, s.rows_per_s, s.doc]);
  byId("stages").append(table(["stage", "state", "rows in", "rows out", "rejected",
    "rejected by reason", "not selected", "not selected by reason", "seconds", "rows/s",
    "what it does"], stageRows, [0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0]));

  // ---- plots
  const plots = byId("plots");
  if (!D.plots.length) plots.append(h("p", {class: "muted", text: "No plots (their inputs are missing)."}));
  const stagesWithPlots = [...new Set(D.plots.map((p) => p.stage))];
  for (const stage of stagesWithPlots) {
    plots.append(h("h3", {text: stage}));
    plots.append(h("div", {class: "plots"}, D.plots.filter((p) => p.stage === stage).map((p) =>
      h("figure", {}, img(p), h("figcaption", {text: p.name})))));
  }
  function img(p) {
    const i = h("img", {alt: p.name});
    if (typeof p.src === "string" && p.src.startsWith("data:image/png;base64,")) i.src = p.src;
    return i;
  }

  // ---- study
  if (D.study) {
    const st = byId("study");
    st.append(h("h2", {text: "Study: one fine-tuned model per selection method"}));
    if (D.study.error) st.append(h("p", {class: "warn", text: D.study.error}));
    if (D.study.table) st.append(table(D.study.table.columns, D.study.table.rows));
    st.append(h("div", {class: "plots"}, D.study.plots.map((p) =>
      h("figure", {}, img(p), h("figcaption", {text: p.name})))));
    if (D.study.markdown) st.append(h("details", {}, h("summary", {text: "study.md"}),
      h("pre", {text: D.study.markdown})));
  } else {
    byId("study").remove();
    document.querySelector('nav a[href="#study"]').remove();
  }

  // ---- sources and rejects
  const statusNames = Object.keys(D.status_facts || {});
  const rejectStages = [...new Set((D.reject_summary || []).map((r) => r.stage))];
  byId("sources").append(D.sources.length ? table(
    ["source file", "rows in pool", ...statusNames, ...rejectStages.map((s) => "rejected at " + s)],
    D.sources.map((s) => [s.source || "(unknown)", s.rows, ...statusNames.map((n) => s.status[n] || 0),
      ...rejectStages.map((n) => s.rejected[n] || 0)]),
    [0, 1, ...statusNames.map(() => 1), ...rejectStages.map(() => 1)])
    : h("p", {class: "muted", text: "No source information."}));
  const rejects = byId("rejects");
  if (!D.reject_summary.length) rejects.append(h("p", {class: "muted", text: "No rejects."}));
  else rejects.append(table(["stage", "reason", "rows", "in this page", ""],
    D.reject_summary.map((r, k) => [r.stage, r.reason, r.total, r.shown,
      h("button", {text: "browse", onclick: () => { setFilters({status: "rj" + k}); go(); }})]),
    [0, 0, 1, 1, 0]));

  // ---- statistics
  byId("statistics").append(value(D.statistics, 0));

  // ---- the browser
  const scoreName = D.row_score;
  const F = {status: "all", source: "all", min: null, max: null, q: "", sort: "default", page: 0};
  const statusSel = byId("f-status");
  const opts = [["all", `all rows (${fmt(N)})`]];
  for (const [name, f] of Object.entries(D.status_facts || {})) {
    opts.push([name, `${name} (${fmt(f.shown)} of ${fmt(f.total)})`]);
  }
  if (D.reject_summary.length) {
    opts.push(["rejected", `rejected (${fmt(D.reject_summary.reduce((a, r) => a + r.shown, 0))} of ${fmt(rejTotal)})`]);
    D.reject_summary.forEach((r, k) =>
      opts.push(["rj" + k, `rejected at ${r.stage}: ${r.reason} (${fmt(r.shown)} of ${fmt(r.total)})`]));
  }
  for (const [v, label] of opts) statusSel.append(h("option", {value: v, text: label}));
  const sourceSel = byId("f-source");
  sourceSel.append(h("option", {value: "all", text: "all sources"}));
  for (const s of D.sources) sourceSel.append(h("option", {value: s.source, text: s.source || "(unknown)"}));
  const sortSel = byId("f-sort");
  const sorts = [["default", "rank, then input order"], ["score_desc", "score, high to low"],
    ["score_asc", "score, low to high"], ["cosine_desc", "cosine to the rejecting row, high to low"],
    ["cosine_asc", "cosine to the rejecting row, low to high (borderline first)"]];
  for (const [v, label] of sorts) sortSel.append(h("option", {value: v, text: label}));
  if (!scoreName) {
    byId("l-min").style.display = "none";
    byId("l-max").style.display = "none";
  } else {
    byId("l-min").firstChild.textContent = scoreName + " from";
    byId("l-max").firstChild.textContent = scoreName + " to";
  }

  const f = D.sampling || {};
  const notes = [`This page holds every selected row in rank order (up to ${fmt(f.max_selected)}), ` +
    `a fixed-seed (seed ${fmt(f.seed)}) sample of up to ${fmt(f.per_status)} rows of every other status ` +
    `with the selected rows that rejected them, the ${fmt(f.top_bottom)} best and worst rows by score, ` +
    `and the first ${fmt(f.rejects_per_reason)} rejects per stage and reason. ` +
    `Texts are cut at ${fmt(f.message_chars)} characters per message and ${fmt(f.row_chars)} per row. ` +
    "Counts in brackets: held of total."];
  byId("sampling").textContent = notes.join(" ");

  const selectedAt = new Map();
  for (let i = 0; i < N; i++) if (R.status[i] === "selected") selectedAt.set(R.id[i], i);
  const score = (i) => { const v = scoreName ? R.scores[i][scoreName] : undefined;
                         return typeof v === "number" ? v : null; };
  const hay = new Array(N);
  function haystack(i) {
    if (hay[i] === undefined) {
      const parts = [R.id[i], R.source[i], R.reason[i], R.detail[i], R.raw[i] ? R.raw[i][0] : ""];
      for (const m of R.messages[i] || []) parts.push(m[1]);
      hay[i] = parts.filter((x) => x).join("\n").toLowerCase();
    }
    return hay[i];
  }
  function matches(i) {
    const st = R.status[i];
    if (F.status === "rejected") { if (st !== "rejected") return false; }
    else if (F.status.startsWith("rj")) {
      const r = D.reject_summary[+F.status.slice(2)];
      if (st !== "rejected" || R.stage[i] !== r.stage || R.reason[i] !== r.reason) return false;
    } else if (F.status !== "all" && st !== F.status) return false;
    if (F.source !== "all" && (R.source[i] || "") !== F.source) return false;
    if (F.min !== null || F.max !== null) {
      const s = score(i);
      if (s === null || (F.min !== null && s < F.min) || (F.max !== null && s > F.max)) return false;
    }
    return !F.q || haystack(i).includes(F.q);
  }
  const nullsLast = (a, b, dir) => (a === null ? (b === null ? 0 : 1) : b === null ? -1 : dir * (a - b));
  function order(a, b) {
    if (F.sort === "score_desc") return nullsLast(score(a), score(b), -1) || a - b;
    if (F.sort === "score_asc") return nullsLast(score(a), score(b), 1) || a - b;
    if (F.sort === "cosine_desc") return nullsLast(R.cosine[a], R.cosine[b], -1) || a - b;
    if (F.sort === "cosine_asc") return nullsLast(R.cosine[a], R.cosine[b], 1) || a - b;
    return nullsLast(R.rank[a], R.rank[b], 1) || a - b;
  }
  function messages(i) {
    const list = R.messages[i], hidden = R.hidden[i];
    if (!list) return h("p", {class: "muted", text: "(text not available in this report)"});
    return [list.map(([role, text, cut]) => h("div", {
      class: "msg role-" + (["system", "user", "assistant"].includes(role) ? role : "other")},
      h("div", {class: "role", text: role}), h("pre", {text: text}),
      cut ? h("div", {class: "cut", text: `\u2026 ${fmt(cut)} more characters`}) : null)),
      hidden ? h("div", {class: "cut", text: `\u2026 ${fmt(hidden[0])} more messages ` +
        `(${fmt(hidden[1])} characters) not held by this page`}) : null];
  }
  function scoreLine(i) {
    const parts = Object.entries(R.scores[i]).map(([k, v]) =>
      `${k}: ${Array.isArray(v) ? "[" + v.map(fmt).join(", ") + "]" : fmt(v)}`);
    if (R.max_sim[i] !== null) parts.push(`max_sim: ${fmt(R.max_sim[i])}`);
    return parts.join(" \u00b7 ");
  }
  function card(i) {
    const st = R.status[i];
    const head = h("div", {class: "row-head"}, h("span", {class: "badge " + st, text: st}),
      h("span", {class: "id", text: R.id[i] === null ? "(no id)" : R.id[i]}),
      R.rank[i] !== null ? h("span", {text: "rank " + fmt(R.rank[i])}) : null,
      R.source[i] ? h("span", {class: "muted", text: R.source[i]}) : null,
      score(i) !== null ? h("span", {text: `${scoreName} ${fmt(score(i))}`}) : null);
    const body = [head, h("div", {class: "scores", text: scoreLine(i)})];
    if (st === "rejected") {
      const at = R.range[i];
      body.push(h("div", {class: "why", text: `rejected at ${R.stage[i]}: ${R.reason[i]}` +
        (R.detail[i] ? ` \u2014 ${R.detail[i]}` : "") +
        (at ? ` (input ${at[2] || ""} ${fmt(at[0])}\u2013${fmt(at[1])})` : "")}));
      const raw = R.raw[i] || ["", 0];
      body.push(h("pre", {class: "raw", text: raw[0]}));
      if (raw[1]) body.push(h("div", {class: "cut", text: `\u2026 ${fmt(raw[1])} more characters`}));
    } else if (R.rejected_by[i] !== null) {
      const j = selectedAt.get(R.rejected_by[i]);
      body.push(h("div", {class: "why", text: `Not picked: cosine ${fmt(R.cosine[i])} to selected row ` +
        `${R.rejected_by[i]}` + (j !== undefined ? ` (rank ${fmt(R.rank[j])})` : "") +
        (D.tau !== null && D.tau !== undefined ? `, above tau = ${fmt(D.tau)}` : "")}));
      body.push(h("div", {class: "pair"},
        h("div", {}, h("h4", {text: "this row"}), messages(i)),
        h("div", {}, h("h4", {text: "the selected row it was too similar to"}),
          j !== undefined ? messages(j)
                          : h("p", {class: "muted", text: "(not held by this page)"}))));
    } else {
      body.push(messages(i));
    }
    return h("div", {class: "row-card", "data-status": st, "data-id": R.id[i]}, body);
  }
  let matched = [];
  function render() {
    const pages = Math.max(1, Math.ceil(matched.length / PAGE_SIZE));
    F.page = Math.min(Math.max(0, F.page), pages - 1);
    const start = F.page * PAGE_SIZE;
    const box = byId("rows");
    box.replaceChildren(...matched.slice(start, start + PAGE_SIZE).map(card));
    byId("count").textContent = `${fmt(matched.length)} rows match \u00b7 page ${F.page + 1} of ${pages}`;
    box.setAttribute("data-matched", String(matched.length));
  }
  function apply() {
    matched = [];
    for (let i = 0; i < N; i++) if (matches(i)) matched.push(i);
    matched.sort(order);
    render();
  }
  function readFilters() {
    const num = (el) => (el.value.trim() === "" || isNaN(+el.value) ? null : +el.value);
    F.status = statusSel.value; F.source = sourceSel.value; F.sort = sortSel.value;
    F.min = num(byId("f-min")); F.max = num(byId("f-max"));
    F.q = byId("f-search").value.trim().toLowerCase(); F.page = 0;
    apply();
  }
  function setFilters(v) {
    statusSel.value = v.status || "all"; sourceSel.value = v.source || "all";
    sortSel.value = v.sort || "default"; byId("f-min").value = ""; byId("f-max").value = "";
    byId("f-search").value = "";
    readFilters();
  }
  const go = () => byId("browser").scrollIntoView();
  for (const id of ["f-status", "f-source", "f-sort", "f-min", "f-max"]) byId(id).addEventListener("change", readFilters);
  byId("f-search").addEventListener("input", readFilters);
  for (const id of ["prev", "prev2"]) byId(id).addEventListener("click", () => { F.page--; render(); });
  for (const id of ["next", "next2"]) byId(id).addEventListener("click", () => { F.page++; render(); });
  const presets = [["Selected, in rank order", {status: "selected"}],
    ["Near-duplicates: why not picked", {status: "similar_to_selected", sort: "cosine_desc"}],
    ["Near-duplicates: borderline first", {status: "similar_to_selected", sort: "cosine_asc"}],
    ["Top scored", {sort: "score_desc"}], ["Bottom scored", {sort: "score_asc"}],
    ["Rejects", {status: "rejected"}], ["Everything", {}]];
  for (const [label, v] of presets) {
    if (v.status && ![...statusSel.options].some((o) => o.value === v.status)) continue;
    if (v.sort && v.sort.startsWith("score") && !scoreName) continue;
    byId("presets").append(h("button", {text: label, onclick: () => setFilters(v)}));
  }
  setFilters(selectedAt.size ? {status: "selected"} : {});
  document.body.setAttribute("data-ready", "1");
})();
</script>
</body>
</html>
"""

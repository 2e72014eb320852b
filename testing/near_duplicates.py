"""Near-duplicate detection, measured: labelled sets and the figures of an embedder on them.

A *labelled set* is a list of canonical rows (``messages``) with, per row, the keys of what it
says (``meaning``) and its ``template``. Two rows are

- near-duplicates when their meanings share a key (the same pair edited in a way that keeps
  its meaning, or in another record format),
- same-template when they share a template but no meaning (``What is 12 + 7?`` vs
  ``What is 40 + 3?``),
- unrelated otherwise.

:func:`real_set` builds one from the real instructions in ``shared/data`` (several record
shapes) with deterministic edits; :func:`demo_set` labels the demo pool (its planted
paraphrases). :func:`embedder_quality` gives, for one embedder's vectors, the cosine
distributions of each kind of pair, the ROC AUC of near-duplicate against unrelated pairs, and,
for each tau of a grid, the precision and recall of the real selector's similarity rejections.
Used by ``benchmarks/near_duplicates.py`` and the regression test.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deita_ray.data.formats import canonicalize
from deita_ray.selection.greedy import normalize_rows, select_diverse

UNRELATED, NEAR_DUPLICATE, SAME_TEMPLATE = 0, 1, 2
PAIR_KINDS = {
    UNRELATED: "unrelated",
    NEAR_DUPLICATE: "near_duplicate",
    SAME_TEMPLATE: "same_template",
}

EDITS = (
    "case_punctuation",
    "polite_prefix",
    "polite_suffix",
    "reordered",
    "edited_answer",
    "other_format",
)
"""The meaning-preserving edits, applied in turn to the base rows."""


@dataclass
class LabelledSet:
    """Rows to embed and what each is about (same positions)."""

    name: str
    messages: list[list[dict]] = field(default_factory=list)
    meaning: list[frozenset[str]] = field(default_factory=list)
    template: list[str] = field(default_factory=list)
    note: list[str] = field(default_factory=list)

    def add(
        self, record: dict, meaning: frozenset[str], template: str = "", note: str = ""
    ) -> None:
        row = canonicalize(record)
        if not isinstance(row, dict):
            raise ValueError(f"{self.name}: record does not parse: {row}")
        self.messages.append(row["messages"])
        self.meaning.append(meaning)
        self.template.append(template)
        self.note.append(note)

    def __len__(self) -> int:
        return len(self.messages)

    def head(self, n: int) -> LabelledSet:
        """The first ``n`` rows (a slice keeps whole groups when built base row by base row)."""
        return LabelledSet(
            self.name, self.messages[:n], self.meaning[:n], self.template[:n], self.note[:n]
        )


# ---------------------------------------------------------------------------------------------
# Sets


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _edit(kind: str, q: str, a: str) -> tuple[str, str]:
    """One meaning-preserving edit of an (instruction, answer) pair."""
    if kind == "case_punctuation":
        return q.lower().rstrip(".?!") + ("!" if q.endswith(".") else ""), a
    if kind == "polite_prefix":
        return "Please help me with this. " + q, a
    if kind == "polite_suffix":
        return q + " Thank you so much!", a
    if kind == "reordered":
        parts = _sentences(q)
        if len(parts) >= 2:
            return " ".join(parts[1:] + parts[:1]), a
        head, sep, tail = q.partition(", ")
        if sep and tail:
            return f"{tail.rstrip('.?!')}, {head[0].lower()}{head[1:]}.", a
        return "I have a question. " + q, a
    if kind == "edited_answer":
        parts = _sentences(a)
        return q, (" ".join(parts[:-1]) if len(parts) >= 2 else a + " I hope this helps.")
    raise ValueError(kind)


def _as_shape(shape: int, q: str, a: str, rid: str) -> dict:
    """The pair in one of four record shapes (the reader turns each into the same messages)."""
    if shape == 0:
        return {"instruction": q, "input": "", "output": a}
    if shape == 1:
        return {
            "id": rid,
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
        }
    if shape == 2:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    return {"instruction": q, "context": "", "response": a}


# Same-template rows: only the numbers or words differ (their answers are computed).
_TEMPLATES = [
    ("add", lambda x, y: (f"What is {x} + {y}?", f"{x} + {y} = {x + y}.")),
    (
        "celsius",
        lambda x, y: (
            f"Convert {x} degrees Celsius to Fahrenheit.",
            f"{x} degrees Celsius is {x * 9 / 5 + 32:g} degrees Fahrenheit.",
        ),
    ),
    (
        "area",
        lambda x, y: (
            f"Calculate the area of a rectangle that is {x} m wide and {y} m long.",
            f"The area is {x} x {y} = {x * y} square meters.",
        ),
    ),
    (
        "speed",
        lambda x, y: (
            f"A car travels {x * y} km in {y} hours. What is its average speed?",
            f"Its average speed is {x * y} / {y} = {x} km per hour.",
        ),
    ),
    (
        "percent",
        lambda x, y: (f"What is {y}% of {x * 4}?", f"{y}% of {x * 4} is {x * 4 * y / 100:g}."),
    ),
]


def _base_pairs(data: Path, per_source: dict[str, int], seed: int) -> list[tuple[str, str, str]]:
    """(source, instruction, answer) drawn from several real files, distinct instructions."""
    rng = random.Random(seed)
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()

    def take(name: str, pairs: list[tuple[str, str]], n: int) -> None:
        rng.shuffle(pairs)
        got = 0
        for q, a in pairs:
            key = q.strip().lower()
            if got == n or not q.strip() or not a.strip() or key in seen:
                continue
            seen.add(key)
            out.append((name, q.strip(), a.strip()))
            got += 1

    alpaca = json.loads((data / "alpaca" / "alpaca_data.json").read_text())
    take(
        "alpaca",
        [
            ((r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")), r["output"])
            for r in alpaca
        ],
        per_source.get("alpaca", 0),
    )
    lima = json.loads((data / "llama_factory" / "lima.json").read_text())
    take(
        "lima",
        [(r["instruction"], r["output"]) for r in lima if not r.get("history")],
        per_source.get("lima", 0),
    )
    for name, rel in (
        ("seed_tasks", "alpaca/seed_tasks.jsonl"),
        ("user_oriented", "gpt4_llm/user_oriented_instructions.jsonl"),
    ):
        rows = [json.loads(x) for x in (data / rel).read_text().splitlines() if x.strip()]
        pairs = []
        for r in rows:
            inst = r["instances"][0]
            q = r["instruction"] + ("\n\n" + inst["input"] if inst.get("input") else "")
            pairs.append((q, inst["output"]))
        take(name, pairs, per_source.get(name, 0))
    return out


DEFAULT_SOURCES = {"alpaca": 160, "lima": 60, "seed_tasks": 60, "user_oriented": 60}


def real_set(
    data: str | Path, per_source: dict[str, int] | None = None, seed: int = 0, numeric: int = 6
) -> LabelledSet:
    """Real instructions with one meaning-preserving variant each, plus same-template rows.

    Row order: base row k, its variant, base row k+1, ... (so :meth:`LabelledSet.head` keeps
    pairs whole), then ``numeric`` rows of each same-template family.

    Args:
        data: the ``shared/data`` folder.
        per_source: base rows per source file (default :data:`DEFAULT_SOURCES`: 340 rows).
        seed: the draw of base rows.
        numeric: rows per same-template family (5 families).
    """
    base = _base_pairs(Path(data), per_source or DEFAULT_SOURCES, seed)
    out = LabelledSet("real")
    for k, (src, q, a) in enumerate(base):
        key = frozenset({f"base{k}"})
        out.add(_as_shape(k % 4, q, a, f"base-{k}"), key, note=src)
        kind = EDITS[k % len(EDITS)]
        if kind == "other_format":
            out.add(_as_shape((k + 1) % 4, q, a, f"variant-{k}"), key, note=kind)
        else:
            q2, a2 = _edit(kind, q, a)
            out.add(_as_shape((k + 2) % 4, q2, a2, f"variant-{k}"), key, note=kind)
    rng = random.Random(seed + 1)
    for name, make in _TEMPLATES:
        for j in range(numeric):
            x, y = rng.randint(3, 97), rng.randint(2, 12)
            q, a = make(x, y)
            out.add(
                _as_shape(j % 4, q, a, f"{name}-{j}"),
                frozenset({f"{name}:{x},{y}"}),
                name,
                "template",
            )
    return out


def demo_set() -> LabelledSet:
    """The demo pool's good rows with the labels its generator knows (planted paraphrases)."""
    from deita_ray.data.demo import demo_labels, demo_records  # noqa: PLC0415

    out = LabelledSet("demo")
    for record, label in zip(demo_records(), demo_labels(), strict=True):
        if label is None:
            continue
        out.add(record, label.meaning, label.template)
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def pair_kinds(labelled: LabelledSet) -> np.ndarray:
    """``[n, n]`` int8 matrix of :data:`PAIR_KINDS` (the diagonal is -1)."""
    n = len(labelled)
    key_ids: dict[str, int] = {}
    rows, cols = [], []
    for i, keys in enumerate(labelled.meaning):
        for k in keys:
            rows.append(i)
            cols.append(key_ids.setdefault(k, len(key_ids)))
    member = np.zeros((n, len(key_ids)), np.float32)
    member[rows, cols] = 1
    near = (member @ member.T) > 0
    tmpl = np.array(labelled.template, dtype=object)
    same_t = (tmpl[:, None] == tmpl[None, :]) & (tmpl[:, None] != "")
    kinds = np.full((n, n), UNRELATED, np.int8)
    kinds[same_t & ~near] = SAME_TEMPLATE
    kinds[near] = NEAR_DUPLICATE
    np.fill_diagonal(kinds, -1)
    return kinds


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """Pairwise cosines of the rows (unit rows in float64, as the selector computes them)."""
    unit = normalize_rows(np.asarray(embeddings, np.float32)).astype(np.float64)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive pair's cosine > a negative pair's), ties counting one half (Mann-Whitney)."""
    both = np.concatenate([positive, negative])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], len(both)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _quantiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {}
    q = np.quantile(x, [0.01, 0.05, 0.5, 0.95, 0.99])
    return {
        "pairs": int(len(x)),
        "min": round(float(x.min()), 4),
        "p01": round(float(q[0]), 4),
        "p05": round(float(q[1]), 4),
        "median": round(float(q[2]), 4),
        "p95": round(float(q[3]), 4),
        "p99": round(float(q[4]), 4),
        "max": round(float(x.max()), 4),
    }


def selector_at(
    embeddings: np.ndarray, kinds: np.ndarray, tau: float, order_seed: int = 0
) -> dict[str, Any]:
    """The real selector over the whole set (equal scores, a fixed shuffled order, no budget):
    what its similarity rejections get right.

    - precision: rejections whose rejecting row (``rejected_by``) is a near-duplicate or
      same-template row; ``precision_strict``: near-duplicates only;
    - recall: of the rows that had a near-duplicate among the rows selected before them, the
      share rejected.
    """
    n = len(kinds)
    seq = np.random.default_rng(order_seed).permutation(n)
    res = select_diverse(embeddings, np.zeros(n), tau, budget=n, seq=seq, device="numpy")
    selected = res.indices
    rejected = np.flatnonzero(res.rejected_by >= 0)
    by = selected[res.rejected_by[rejected]]
    kind = kinds[rejected, by]
    # Rows in examination order; truth: a near-duplicate was selected before the row.
    pos = np.empty(n, np.int64)
    pos[np.argsort(seq, kind="stable")] = np.arange(n)
    sel_pos = np.full(n, np.iinfo(np.int64).max)
    sel_pos[selected] = pos[selected]
    had_dup = ((kinds == NEAR_DUPLICATE) & (sel_pos[None, :] < pos[:, None])).any(axis=1)
    status_rej = np.zeros(n, bool)
    status_rej[rejected] = True
    n_rej = len(rejected)
    bad = [
        (int(r), int(b), round(float(s), 4))
        for r, b, s, k in zip(rejected, by, res.rejected_sim[rejected], kind, strict=True)
        if k == UNRELATED
    ]
    return {
        "tau": tau,
        "selected": int(len(selected)),
        "rejected": int(n_rej),
        "precision": round(float((kind != UNRELATED).mean()), 4) if n_rej else None,
        "precision_strict": round(float((kind == NEAR_DUPLICATE).mean()), 4) if n_rej else None,
        "unrelated_rejections": len(bad),
        "recall": round(float(status_rej[had_dup].mean()), 4) if had_dup.any() else None,
        "unrelated_examples": sorted(bad, key=lambda t: -t[2])[:5],
    }


def embedder_quality(
    embeddings: np.ndarray, labelled: LabelledSet, taus: list[float], order_seed: int = 0
) -> dict[str, Any]:
    """Cosine distributions per pair kind, ROC AUC (near-duplicate vs unrelated pairs), and the
    selector's precision and recall at each tau."""
    kinds = pair_kinds(labelled)
    cos = cosine_matrix(embeddings)
    upper = np.triu(np.ones_like(kinds, bool), 1)
    by_kind = {name: cos[upper & (kinds == k)] for k, name in PAIR_KINDS.items()}
    unrelated = by_kind["unrelated"]
    return {
        "set": labelled.name,
        "rows": len(labelled),
        "cosines": {name: _quantiles(v) for name, v in by_kind.items()},
        "auc": round(roc_auc(by_kind["near_duplicate"], unrelated), 5),
        "auc_with_same_template": round(
            roc_auc(
                np.concatenate([by_kind["near_duplicate"], by_kind["same_template"]]), unrelated
            ),
            5,
        ),
        "taus": [
            {
                **selector_at(embeddings, kinds, t, order_seed),
                "unrelated_pairs_above": int((unrelated > t).sum()),
            }
            for t in taus
        ],
    }

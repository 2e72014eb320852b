"""Benchmark: does the embedder know a near-duplicate? (docs/embedding.md, "Choosing an embedder")

Two labelled sets (``testing/near_duplicates.py``):

- ``real``: real instructions from ``shared/data`` (Alpaca, LIMA, Self-Instruct seed tasks,
  user-oriented instructions; four record shapes), each with one variant made by an edit that
  keeps its meaning (case and punctuation, a polite prefix or suffix, reordered sentences, a
  lightly edited answer, the same pair in another record format), plus same-template rows that
  differ only in their numbers;
- ``demo``: the demo pool's good rows, labelled by its generator (planted paraphrases, a seed in
  several shapes, conversations that contain a seed).

For each embedder (default: SmolLM2 last token of the vicuna rendering — the paper's rule —,
SmolLM2 mean over tokens, and the embedded MiniLM; ``--embedder NAME=PATH[,pooling=P][,text=T]``
adds any model): the cosine distributions of near-duplicate, same-template and unrelated pairs,
the ROC AUC of near-duplicate against unrelated pairs, and at each tau of a grid the precision
and recall of the real selector's similarity rejections. The embeddings go through the embed
stage's own code (``Embedder``, vLLM pooling runner by default). The run checks that vLLM and
the ``hf`` backend give the same MiniLM vectors (per-row cosine >= 0.99999) and exits 1 if not.

Goals (issue #23): MiniLM AUC >= 0.98 on ``real``; at the quickstart's tau, precision >= 0.95
on ``demo`` with no unrelated pair above tau.

Writes ``benchmarks/results/near_duplicates.json`` and ``benchmarks/results/near_duplicates.png``.

Usage: ``python benchmarks/near_duplicates.py [--quick] [--data DIR] [--embedder ...]``
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks._common import (  # noqa: E402
    apply_model_env,
    finish,
    model_cfg,
    require,
    resolve_model,
    results_dir,
    shared_data,
)
from testing.near_duplicates import (  # noqa: E402
    PAIR_KINDS,
    LabelledSet,
    cosine_matrix,
    demo_set,
    embedder_quality,
    pair_kinds,
    real_set,
)

QUICKSTART_TAU = 0.8
"""The quickstart's tau (jobs/quickstart.yaml), where the goals are read."""

TAUS = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995]
MIN_COS_BACKENDS = 0.99999
DEFAULT_EMBEDDERS = [
    "smollm2_last=embedded:smollm2,pooling=last,text=vicuna",
    "smollm2_mean=embedded:smollm2,pooling=mean,text=vicuna",
    "minilm=embedded:minilm",
]


def parse_embedder(spec: str) -> tuple[str, str, dict[str, str]]:
    """``NAME=PATH[,pooling=P][,text=T][,normalize=true]`` -> (name, path, overrides)."""
    name, _, rest = spec.partition("=")
    path, *opts = rest.split(",")
    if not name or not path:
        raise SystemExit(f"--embedder {spec!r}: expected NAME=PATH[,pooling=P][,text=T]")
    overrides = dict(o.split("=", 1) for o in opts)
    return name, path, overrides


def embed_rows(
    labelled: LabelledSet, path: str, overrides: dict[str, str], backend: str, max_length: int
) -> tuple[np.ndarray, str, float]:
    """The set's vectors through the embed stage's ``Embedder`` (in this process)."""
    import pyarrow as pa

    from deita_ray.config import EmbedConfig
    from deita_ray.models.embedding_spec import resolve_embedding_spec
    from deita_ray.stages.embed import Embedder

    local = resolve_model(path)
    ecfg = EmbedConfig(
        pooling=overrides.get("pooling", "auto"),
        text=overrides.get("text", "auto"),
        normalize={"true": True, "false": False}.get(overrides.get("normalize", "")),
    )
    spec = resolve_embedding_spec(ecfg, local)
    t = time.perf_counter()
    embedder = Embedder(model_cfg(local, backend), local, max_length, spec=spec)
    table = pa.table({"id": [str(i) for i in range(len(labelled))], "messages": labelled.messages})
    out = embedder(table)
    seconds = time.perf_counter() - t
    embedder.backend.close()
    if out["_reject_reason"].null_count != out.num_rows:
        bad = [r for r in out["_reject_reason"].to_pylist() if r]
        raise SystemExit(f"{path}: {len(bad)} rows not embedded ({sorted(set(bad))})")
    return np.array(out["embedding"].to_pylist(), np.float32), spec.describe(), seconds


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        r = results[name]
        ax = axes[0][col]
        for kind, color in (
            ("unrelated", "tab:gray"),
            ("same_template", "tab:orange"),
            ("near_duplicate", "tab:blue"),
        ):
            vals = r["real_cosines"][kind]
            if len(vals):
                ax.hist(
                    vals,
                    bins=60,
                    range=(-0.2, 1.0),
                    density=True,
                    alpha=0.55,
                    color=color,
                    label=kind,
                )
        ax.set_title(f"{name}: AUC {r['real']['auc']:.3f}", fontsize=9)
        ax.set_xlabel("cosine (real set)")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for set_name, style in (("real", "-"), ("demo", "--")):
            taus = [t["tau"] for t in r[set_name]["taus"]]
            prec = [
                t["precision"] if t["precision"] is not None else np.nan
                for t in r[set_name]["taus"]
            ]
            rec = [t["recall"] if t["recall"] is not None else np.nan for t in r[set_name]["taus"]]
            ax.plot(taus, prec, style, color="tab:green", label=f"precision ({set_name})")
            ax.plot(taus, rec, style, color="tab:purple", label=f"recall ({set_name})")
        ax.axvline(QUICKSTART_TAU, color="k", lw=0.6, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("tau")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="the shared data folder")
    ap.add_argument("--quick", action="store_true", help="60 base rows, MiniLM only")
    ap.add_argument(
        "--embedder", action="append", default=None, help="NAME=PATH[,pooling=P][,text=T]"
    )
    ap.add_argument("--backend", default="vllm", choices=("vllm", "hf"))
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    apply_model_env()
    data = shared_data(args.data)
    sources = (
        {"alpaca": 30, "lima": 10, "seed_tasks": 10, "user_oriented": 10} if args.quick else None
    )
    sets = {"real": real_set(data, sources), "demo": demo_set()}
    specs = args.embedder or (DEFAULT_EMBEDDERS[2:] if args.quick else DEFAULT_EMBEDDERS)
    results: dict[str, Any] = {}
    vectors: dict[str, dict[str, np.ndarray]] = {}
    for spec in specs:
        name, path, overrides = parse_embedder(spec)
        entry: dict[str, Any] = {"model": path, "seconds": {}}
        vectors[name] = {}
        for set_name, labelled in sets.items():
            emb, rule, seconds = embed_rows(
                labelled, path, overrides, args.backend, args.max_length
            )
            vectors[name][set_name] = emb
            entry["rule"] = rule
            entry["seconds"][set_name] = round(seconds, 2)
            entry[set_name] = embedder_quality(emb, labelled, TAUS)
            print(f"{name} {set_name}: AUC {entry[set_name]['auc']}", flush=True)
        results[name] = entry

    # The embed stage's two backends must agree on MiniLM (the same vectors, per row).
    checks: dict[str, bool] = {}
    facts: dict[str, Any] = {}
    if "minilm" in vectors:
        other = "hf" if args.backend == "vllm" else "vllm"
        emb_other, _, _ = embed_rows(sets["real"], "embedded:minilm", {}, other, args.max_length)
        a, b = vectors["minilm"]["real"], emb_other
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        facts["minilm_backends_min_cosine"] = float(cos.min())
        checks["minilm_vllm_equals_hf"] = bool(cos.min() >= MIN_COS_BACKENDS)
    require("near_duplicates", checks, facts)

    goals: dict[str, Any] = {}
    if "minilm" in results:
        m = results["minilm"]
        at = next(t for t in m["demo"]["taus"] if t["tau"] == QUICKSTART_TAU)
        goals = {
            "minilm_auc_real": m["real"]["auc"],
            "minilm_auc_real_goal_0.98_met": m["real"]["auc"] >= 0.98,
            "demo_precision_at_quickstart_tau": at["precision"],
            "demo_precision_goal_0.95_met": (at["precision"] or 0) >= 0.95,
            "demo_unrelated_pairs_above_quickstart_tau": at["unrelated_pairs_above"],
        }
    png = results_dir() / "near_duplicates.png"
    kinds = pair_kinds(sets["real"])
    upper = np.triu(np.ones_like(kinds, bool), 1)
    for name, r in results.items():
        cos = cosine_matrix(vectors[name]["real"])
        r["real_cosines"] = {
            kind: cos[upper & (kinds == code)] for code, kind in PAIR_KINDS.items()
        }
    if not args.quick:
        plot(results, png)
    for r in results.values():
        del r["real_cosines"]
    readme = []
    for name, r in results.items():
        at = {s: next(t for t in r[s]["taus"] if t["tau"] == QUICKSTART_TAU) for s in sets}
        readme.append(
            {
                "setting": f"{name} ({r['rule']}): {sets['real'].name} set {r['real']['rows']} rows, demo {r['demo']['rows']} rows",
                "result": (
                    f"AUC {r['real']['auc']:.3f} (demo {r['demo']['auc']:.3f}); at tau {QUICKSTART_TAU}: demo precision "
                    f"{at['demo']['precision']}, {at['demo']['unrelated_pairs_above']} unrelated demo pairs above; "
                    f"real precision {at['real']['precision']}, recall {at['real']['recall']}"
                ),
            }
        )
    payload = {
        "quick": args.quick,
        "backend": args.backend,
        "max_length": args.max_length,
        "taus": TAUS,
        "quickstart_tau": QUICKSTART_TAU,
        "sets": {k: len(v) for k, v in sets.items()},
        "embedders": results,
        "goals": goals,
        "checks": checks,
        "facts": facts,
        "plot": str(png) if not args.quick else None,
        "readme": readme,
    }
    finish("near_duplicates", payload, args.out)


if __name__ == "__main__":
    main()

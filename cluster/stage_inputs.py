"""Stage the paper's inputs on the shared volume once, before the first job runs.

    python cluster/stage_inputs.py --root /mnt/deita          # in cluster/stage-inputs.yaml

Writes under ``--root`` (the deita-shared volume; every path below is what jobs/deita_6k.yaml,
deita_10k.yaml and deita_dpo.yaml read):

- ``pools/x_sota/``: the X_sota pool (about 300K conversations), the dataset repository
  ``AndrewZeng/deita_sota_pool`` that the DEITA reference lists as "deita-sota-pool (300K)"
  (hkust-nlp/deita, README.md, "Deita Resources", commit b279f2c).
- ``pools/ultrafeedback_10k.jsonl``: the 10K preference sample for DPO, made exactly as the
  reference's ``src/deita/data/sample_ultrafeedback.py`` (hkust-nlp/deita, commit acec45c) does:
  ``random.seed(42)``, the ``train_prefs`` split of ``HuggingFaceH4/ultrafeedback_binarized``,
  ``random.sample(range(len(data)), 10000)``, then the rows in that sampled order
  (``data.select(indices)``), one JSON object per line with every column. :func:`sample_indices`
  is that sampling, pure. The split is read from the dataset's Parquet shards in name order, the
  order ``datasets.load_dataset`` reads them in. The sample depends on the split's size, which
  changed between revisions of the dataset (61,966 rows at 8c9daa9, 61,135 at 2a3fb93 and on
  main); the reference pinned none, so pass ``--ultrafeedback-revision`` to fix yours. The
  resolved commit and size go into the manifest.
- ``hf-cache/hub/``: the weights of every hub model the given job configs load (the scorers,
  Mistral-7B-v0.1), downloaded once here so that the jobs' engine actors all read them from the
  volume instead of downloading the same 15 GB at once. ``HF_HOME`` must be ``<root>/hf-cache``,
  as in the Ray pods. Gated models need ``HF_TOKEN``.
- ``staging/manifest.json``: what was staged (repositories, resolved commits, sizes, seed).

Finally it runs the jobs' model preflight offline (:mod:`deita_ray.preflight`) against the
cache: every hub model must be complete there. Re-running skips what is already staged.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
PAPER_JOBS = tuple(REPO / "jobs" / n for n in ("deita_6k.yaml", "deita_10k.yaml", "deita_dpo.yaml"))

POOL_REPO = "AndrewZeng/deita_sota_pool"
PREFS_REPO = "HuggingFaceH4/ultrafeedback_binarized"
PREFS_SPLIT = "train_prefs"
PREFS_SIZE = 10_000
PREFS_SEED = 42

T = TypeVar("T")


def staged_paths(root: str | os.PathLike) -> dict[str, Path]:
    """Where each input lands under ``root`` (the jobs read these paths with root /mnt/deita)."""
    root = Path(root)
    return {
        "pool": root / "pools" / "x_sota",
        "preferences": root / "pools" / "ultrafeedback_10k.jsonl",
        "hf_home": root / "hf-cache",
        "manifest": root / "staging" / "manifest.json",
    }


# ---------------------------------------------------------------------------------------------
# Pure parts


def sample_indices(population: int, k: int, seed: int = PREFS_SEED) -> list[int]:
    """The reference's sample: ``random.seed(seed); random.sample(range(population), k)``.

    A private ``random.Random(seed)`` yields the same sequence as seeding the module-level
    generator (both are the Mersenne Twister seeded alike), without touching global state.
    """
    if not 0 <= k <= population:
        raise ValueError(f"cannot sample {k} of {population} rows")
    return random.Random(seed).sample(range(population), k)


def sample_rows(rows: Sequence[T], k: int, seed: int = PREFS_SEED) -> list[T]:
    """``rows`` at :func:`sample_indices`, in sampled order (as ``Dataset.select`` keeps it)."""
    return [rows[i] for i in sample_indices(len(rows), k, seed)]


def files_to_fetch(repo_files: Sequence[str]) -> list[str]:
    """The files of a model repository that make one loadable copy: top-level configs,
    tokenizer and remote code, and the safetensors weights when there are any, else the PyTorch
    ``.bin`` ones. Many repositories carry both formats, some also a ``consolidated`` file or an
    ``original/`` folder for other runtimes; vLLM and transformers need one set."""
    top = [f for f in repo_files if "/" not in f]
    small = [f for f in top if f.endswith((".json", ".model", ".tiktoken", ".txt", ".py"))]
    sharded = [f for f in top if f.startswith("model") and f.endswith(".safetensors")]
    anysafe = [f for f in top if f.endswith(".safetensors")]
    weights = sharded or anysafe or [f for f in top if re.match(r"pytorch_model.*\.bin$", f)]
    return sorted(small + weights)


def pool_patterns() -> list[str]:
    """The pool files to fetch: those the pipeline's directory reader picks up."""
    from deita_ray.data.read import POOL_SUFFIXES

    return ["*" + s for s in POOL_SUFFIXES]


def hub_models(job_configs: Sequence[str | os.PathLike]) -> dict[str, list[str]]:
    """Hub model name -> the ``config key (job)`` entries that load it, over the job configs."""
    from deita_ray.config import EMBEDDED_MODEL, load_config
    from deita_ray.preflight import is_hub_name, models_to_load

    out: dict[str, list[str]] = {}
    for path in job_configs:
        cfg = load_config(path)
        for m in models_to_load(cfg):
            if m.path != EMBEDDED_MODEL and is_hub_name(m.path):
                out.setdefault(m.path, []).append(f"{m.key} ({Path(path).name})")
    return out


# ---------------------------------------------------------------------------------------------
# Staging (network)


def _write_atomic(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.chmod(tmp, 0o664)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stage_pool(root: Path, revision: str) -> dict[str, Any]:
    """Download the X_sota pool files into ``pools/x_sota``."""
    from huggingface_hub import HfApi, snapshot_download

    sha = HfApi().dataset_info(POOL_REPO, revision=revision).sha
    dest = staged_paths(root)["pool"]
    snapshot_download(
        POOL_REPO,
        repo_type="dataset",
        revision=sha,
        local_dir=dest,
        allow_patterns=pool_patterns(),
    )
    files = sorted(
        str(p.relative_to(dest))
        for p in dest.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(dest).parts)
    )
    if not files:
        raise RuntimeError(f"{POOL_REPO}@{sha} has no pool files ({pool_patterns()})")
    return {"repo": POOL_REPO, "revision": sha, "path": str(dest), "files": files}


def stage_preferences(root: Path, revision: str, previous: dict | None) -> dict[str, Any]:
    """Write the 10K UltraFeedback sample (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi, snapshot_download

    sha = HfApi().dataset_info(PREFS_REPO, revision=revision).sha
    dest = staged_paths(root)["preferences"]
    wanted = {"repo": PREFS_REPO, "revision": sha, "split": PREFS_SPLIT}
    wanted |= {"size": PREFS_SIZE, "seed": PREFS_SEED}
    if dest.is_file() and previous and all(previous.get(k) == v for k, v in wanted.items()):
        return previous
    snapshot = Path(
        snapshot_download(
            PREFS_REPO,
            repo_type="dataset",
            revision=sha,
            allow_patterns=[f"data/{PREFS_SPLIT}-*.parquet"],
        )
    )
    shards = sorted((snapshot / "data").glob(f"{PREFS_SPLIT}-*.parquet"))
    if not shards:
        raise RuntimeError(f"{PREFS_REPO}@{sha} has no data/{PREFS_SPLIT}-*.parquet")
    table = pa.concat_tables([pq.read_table(s) for s in shards])
    indices = sample_indices(table.num_rows, PREFS_SIZE, PREFS_SEED)
    rows = table.take(pa.array(indices)).to_pylist()
    _write_atomic(dest, [json.dumps(r, ensure_ascii=False) + "\n" for r in rows])
    return wanted | {
        "path": str(dest),
        "split_rows": table.num_rows,
        "shards": [s.name for s in shards],
        "first_indices": indices[:5],
    }


def stage_models(models: dict[str, list[str]]) -> dict[str, Any]:
    """Download each hub model's weights into the HF cache (``HF_HOME``) once."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    out = {}
    for repo_id, used_by in models.items():
        # The default revision, so that the cache records refs/main: the jobs name no revision
        # and resolve the model through that ref offline.
        files = api.list_repo_files(repo_id)
        path = snapshot_download(repo_id, allow_patterns=files_to_fetch(files))
        out[repo_id] = {"revision": Path(path).name, "snapshot": path, "used_by": used_by}
        print(f"model {repo_id}: {path}", flush=True)
    return out


def verify_offline(
    job_configs: Sequence[str | os.PathLike], hf_cache: str | None = None
) -> list[str]:
    """What the jobs' model preflight would find missing, offline, for their hub and embedded
    models (``hf_cache``: None for huggingface_hub's). Local folders are outputs of earlier jobs
    (the DPO job's SFT model): not checked."""
    from huggingface_hub import constants

    from deita_ray.config import EMBEDDED_MODEL, load_config
    from deita_ray.preflight import is_hub_name, model_problem, models_to_load

    problems = []
    for path in job_configs:
        cfg = load_config(path)
        for m in models_to_load(cfg):
            if m.path != EMBEDDED_MODEL and not is_hub_name(m.path):
                continue
            problem = model_problem(
                m,
                cache_dir=cfg.cache_dir,
                hf_cache=hf_cache or constants.HF_HUB_CACHE,
                has_token=False,
                offline=True,
            )
            if problem:
                problems.append(f"{Path(path).name}: {m.key} = {m.path!r}: {problem}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/mnt/deita", help="mount point of the shared volume")
    p.add_argument("--jobs", nargs="*", default=[str(j) for j in PAPER_JOBS], help="job configs")
    p.add_argument("--pool-revision", default="main", help=f"revision of {POOL_REPO}")
    p.add_argument("--ultrafeedback-revision", default="main", help=f"revision of {PREFS_REPO}")
    p.add_argument("--skip", nargs="*", default=[], choices=["pool", "preferences", "models"])
    args = p.parse_args(argv)

    root = Path(args.root)
    from huggingface_hub import constants

    hf_home = staged_paths(root)["hf_home"]
    if not Path(constants.HF_HUB_CACHE).resolve().is_relative_to(hf_home.resolve()):
        print(
            f"HF_HOME must be {hf_home} (the Ray pods read the weights there); the hub cache is "
            f"{constants.HF_HUB_CACHE}",
            file=sys.stderr,
        )
        return 2
    manifest_path = staged_paths(root)["manifest"]
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if "pool" not in args.skip:
        manifest["pool"] = stage_pool(root, args.pool_revision)
    if "preferences" not in args.skip:
        manifest["preferences"] = stage_preferences(
            root, args.ultrafeedback_revision, manifest.get("preferences")
        )
    if "models" not in args.skip:
        manifest["models"] = stage_models(hub_models(args.jobs))
    _write_atomic(manifest_path, [json.dumps(manifest, indent=2) + "\n"])
    problems = verify_offline(args.jobs)
    for line in problems:
        print(f"NOT STAGED: {line}", file=sys.stderr)
    print(f"manifest: {manifest_path}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

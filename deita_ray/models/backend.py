"""The narrow interface between the stages and the inference engines (vLLM, transformers).

A backend is built for one task: ``"score"`` (a causal LM read by prefill only, never
decoding: the next-token logits of the six digit tokens at the end of each prompt, and the
per-token log-probabilities of given token sequences) or ``"embed"`` (the final hidden states, after
the final norm, pooled into one vector per prompt: the last token, the mean over the tokens or
the first token). Every call takes *token ids*, tokenised once by
the caller with the backend's tokenizer, so that truncation is exact and both engines see the
same tokens.

Per-prompt failures (e.g. the engine refuses one prompt) do not fail the batch: the batch is
bisected until the failing prompts are isolated, and each one gets an error message instead of
a value. Broken contracts (an engine that does not return the six digit log-probabilities, a
dead engine) raise, because no row could be scored correctly.

Example:
    >>> backend = load_backend(model_cfg, "/path/to/model", "score")  # doctest: +SKIP
    >>> logits, errors = backend.digit_logits([[1, 42, 7]], digit_ids)  # doctest: +SKIP
    >>> logprobs, errors = backend.token_logprobs([[1, 42, 7]], [1])  # doctest: +SKIP
    >>> logprobs[0]  # log p(42 | 1), log p(7 | 1 42)  # doctest: +SKIP
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deita_ray.config import ModelConfig
from deita_ray.runtime import has_cuda

TASKS = ("score", "embed", "generate")
POOLINGS = ("last", "mean", "cls")
"""Embedding pooling over a prompt's final hidden states (docs/embedding.md)."""


class BackendContractError(RuntimeError):
    """The engine broke an assumption every result depends on; never turned into a row reject."""


def resolve_dtype(dtype: str) -> str:
    """'auto' -> 'bfloat16' on a CUDA machine, 'float32' on CPU; other values unchanged."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_cuda() else "float32"


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The HF tokenizer of a model folder: the one scoring, embedding and training all use.

    A tokenizer without a pad token gets its EOS token as pad. Padding only fills batches
    (always masked, never a label), and the pad token is not added to the vocabulary, so
    encodings are the same with or without it.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


class Backend(ABC):
    """A loaded model for one task.

    Attributes:
        cfg: the model config.
        path: the resolved local model path.
        task: "score" or "embed".
        pooling: how ``"embed"`` pools the final hidden states (one of :data:`POOLINGS`).
        tokenizer: the HF tokenizer prompts must be encoded with.
        hidden_size: embedding dimension (the model's hidden size).
    """

    name = "base"

    def __init__(self, cfg: ModelConfig, path: str, task: str, pooling: str = "last"):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.cfg = cfg
        self.path = path
        self.task = task
        self.pooling = pooling
        self.dtype = resolve_dtype(cfg.dtype)
        self.tokenizer = load_tokenizer(path, cfg.trust_remote_code)
        self.hidden_size = 0

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt this backend accepts: scoring needs one slot for the next token."""
        return self.cfg.max_model_len - 1 if self.task == "score" else self.cfg.max_model_len

    # Engine calls on the whole list; implementations raise on any failure.
    @abstractmethod
    def _digit_logits(self, prompts: list[list[int]], digit_ids: list[int]) -> np.ndarray:
        """``(n, len(digit_ids))`` logits or log-probabilities of the label tokens after each
        prompt."""

    @abstractmethod
    def _pooled_hidden(self, prompts: list[list[int]]) -> np.ndarray:
        """``(n, hidden_size)`` float32 final hidden states of each prompt, pooled as
        :attr:`pooling` says (not normalised)."""

    @abstractmethod
    def _token_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[np.ndarray]:
        """Per sequence, ``log p(tok_j | tok_<j)`` for ``j`` in ``[start, len)``: the raw
        log-softmax of the model's logits in fp32 (no sampling processor applied)."""

    def _generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[str]:
        """Greedy continuation text of each prompt (special tokens skipped), at most
        ``max_tokens[i]`` tokens, stopping at the model's end of turn / EOS."""
        raise NotImplementedError(f"the {self.name} backend cannot generate")

    def _fatal(self, exc: BaseException) -> bool:
        """Whether an exception means the engine itself is unusable (re-raised)."""
        return isinstance(exc, (BackendContractError, MemoryError))

    def digit_logits(
        self, prompts: Sequence[list[int]], digit_ids: list[int]
    ) -> tuple[np.ndarray, list[str | None]]:
        """Label-token logits of every prompt, in one engine call when nothing fails.

        Args:
            prompts: token ids per prompt.
            digit_ids: the label token ids (the six digits "1".."6" for DEITA; a ``rating``
                scorer's N labels).

        Returns:
            ``(values (n, len(digit_ids)) float64 with NaN rows where failed, errors: None or
            message)``.
        """
        if self.task != "score":
            raise RuntimeError("this backend was loaded for embedding, not scoring")
        return self._isolate(
            lambda ps: self._digit_logits(ps, digit_ids), list(prompts), len(digit_ids)
        )

    def embed(self, prompts: Sequence[list[int]]) -> tuple[np.ndarray, list[str | None]]:
        """Pooled final hidden states of every prompt, in one engine call when nothing fails.

        Returns:
            ``(values (n, hidden_size) float32 with NaN rows where failed, errors)``.
        """
        if self.task != "embed":
            raise RuntimeError("this backend was loaded for scoring, not embedding")
        return self._isolate(self._pooled_hidden, list(prompts), self.hidden_size)

    def token_logprobs(
        self, sequences: Sequence[list[int]], starts: Sequence[int]
    ) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Log-probabilities of the tokens of each sequence given everything before them.

        One prefill per sequence (batched by the engine), never decoding. The values are the
        raw log-softmax of the model's logits computed in fp32 — no temperature, no allowed-token
        mask, whatever the engine's ``logprobs_mode`` (vLLM applies no sampling processor to
        prompt tokens) — so that both backends compute the same number.

        Args:
            sequences: token ids (BOS included where the caller wants it).
            starts: per sequence, the first position ``j >= 1`` to return (position 0 has no
                context); ``start == len`` gives an empty array.

        Returns:
            ``(values, errors)``: per sequence a float64 array of ``log p(tok_j | tok_<j)`` for
            ``j`` in ``[start, len)`` or None, and None or an error message. A sequence longer
            than :attr:`max_prompt_tokens`, a bad ``start`` or an engine error on one sequence
            fails that sequence only.
        """
        if self.task != "score":
            raise RuntimeError("this backend was loaded for embedding, not scoring")
        if len(sequences) != len(starts):
            raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
        values: list[np.ndarray | None] = [None] * len(sequences)
        errors: list[str | None] = [None] * len(sequences)
        live: list[int] = []
        for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
            if not 1 <= int(start) <= len(seq):
                errors[i] = f"ValueError: start {start} outside [1, {len(seq)}]"
            elif len(seq) > self.max_prompt_tokens:
                errors[i] = (
                    f"ValueError: sequence has {len(seq)} tokens > {self.max_prompt_tokens} "
                    f"(max_model_len {self.cfg.max_model_len} - 1)"
                )
            else:
                live.append(i)
        seqs = [list(sequences[i]) for i in live]
        begin = [int(starts[i]) for i in live]

        def accept(lo: int, hi: int, got: list[np.ndarray]) -> None:
            if len(got) != hi - lo:
                raise BackendContractError(
                    f"{self.name} backend returned {len(got)} results for {hi - lo} sequences"
                )
            for k, arr in zip(range(lo, hi), got, strict=True):
                arr = np.asarray(arr, dtype=np.float64)
                want = len(seqs[k]) - begin[k]
                if arr.shape != (want,):
                    raise BackendContractError(
                        f"{self.name} backend returned {arr.shape} log-probabilities, expected "
                        f"({want},)"
                    )
                values[live[k]] = arr

        errs = self._bisect(
            lambda lo, hi: self._token_logprobs(seqs[lo:hi], begin[lo:hi]), len(seqs), accept
        )
        for k, err in enumerate(errs):
            if err is not None:
                errors[live[k]] = err
        return values, errors

    def generate(
        self, prompts: Sequence[list[int]], max_tokens: int | Sequence[int]
    ) -> tuple[list[str | None], list[str | None]]:
        """Greedy generations (temperature 0) of every prompt, batched by the engine.

        Needs a causal LM: a backend loaded for ``"generate"`` (or ``"score"``, the same
        engine kind). A prompt the engine refuses fails alone (bisected like the other calls).

        Args:
            prompts: token ids (BOS included where the caller wants it).
            max_tokens: new-token limit, one for all or one per prompt.

        Returns:
            ``(texts, errors)``: per prompt the generated text or None, and None or a message.
        """
        if self.task not in ("score", "generate"):
            raise RuntimeError("this backend was loaded for embedding, not generation")
        prompts = list(prompts)
        budgets = (
            [int(max_tokens)] * len(prompts)
            if isinstance(max_tokens, int)
            else [int(m) for m in max_tokens]
        )
        if len(budgets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(budgets)} max_tokens")
        texts: list[str | None] = [None] * len(prompts)

        def accept(lo: int, hi: int, got: list[str]) -> None:
            if len(got) != hi - lo or not all(isinstance(t, str) for t in got):
                raise BackendContractError(
                    f"{self.name} backend returned {len(got)} texts for {hi - lo} prompts"
                )
            texts[lo:hi] = got

        errors = self._bisect(
            lambda lo, hi: self._generate(prompts[lo:hi], budgets[lo:hi]), len(prompts), accept
        )
        return texts, errors

    def _isolate(
        self, fn: Callable[[list[list[int]]], np.ndarray], prompts: list[list[int]], width: int
    ) -> tuple[np.ndarray, list[str | None]]:
        out = np.full((len(prompts), width), np.nan, dtype=np.float64)

        def accept(lo: int, hi: int, got: Any) -> None:
            vals = np.asarray(got, dtype=np.float64)
            if vals.shape != (hi - lo, width):
                raise BackendContractError(
                    f"{self.name} backend returned shape {vals.shape}, expected {(hi - lo, width)}"
                )
            out[lo:hi] = vals

        errors = self._bisect(lambda lo, hi: fn(prompts[lo:hi]), len(prompts), accept)
        return out, errors

    def _bisect(
        self,
        call: Callable[[int, int], Any],
        n: int,
        accept: Callable[[int, int, Any], None],
    ) -> list[str | None]:
        """Run ``call(0, n)``; on a non-fatal error bisect until each failing item is alone.

        ``accept(lo, hi, result)`` stores a successful result (and raises
        :class:`BackendContractError` on a malformed one). Returns per-item error messages.
        """
        errors: list[str | None] = [None] * n

        def run(lo: int, hi: int) -> None:
            try:
                got = call(lo, hi)
            except Exception as e:
                if self._fatal(e):
                    raise
                if hi - lo == 1:
                    errors[lo] = f"{type(e).__name__}: {e}"[:2000]
                    return
                mid = (lo + hi) // 2  # bisect: isolates k bad prompts in O(k log n) calls
                run(lo, mid)
                run(mid, hi)
                return
            accept(lo, hi, got)

        if n:
            run(0, n)
        return errors

    def close(self) -> None:
        """Release the engine (best effort; subclasses free their engine)."""
        self.closed = True


def load_backend(cfg: ModelConfig, path: str, task: str, pooling: str = "last") -> Backend:
    """Build the backend named by ``cfg.backend`` for ``task`` on a local model folder.

    Args:
        cfg: the model config (backend, dtype, context length, engine options).
        path: the model folder, already resolved by
            :func:`deita_ray.models.registry.resolve_model_path`.
        task: "score", "embed" or "generate".
        pooling: for "embed", one of :data:`POOLINGS`.
    """
    if cfg.backend == "vllm":
        from deita_ray.models.vllm_backend import VLLMBackend  # noqa: PLC0415

        return VLLMBackend(cfg, path, task, pooling)
    if cfg.backend == "hf":
        from deita_ray.models.hf_backend import HFBackend  # noqa: PLC0415

        return HFBackend(cfg, path, task, pooling)
    raise ValueError(f"unknown backend {cfg.backend!r} (allowed: vllm, hf)")

"""The narrow interface between the stages and the inference engines (vLLM, transformers).

A backend is built for one task: ``"score"`` (next-token logits of the six digit tokens at the
end of each prompt, one prefill per prompt, never decoding) or ``"embed"`` (final hidden state,
after the final norm, at each prompt's last token). Both take *token ids*, tokenised once by
the caller with the backend's tokenizer, so that truncation is exact and both engines see the
same tokens.

Per-prompt failures (e.g. the engine refuses one prompt) do not fail the batch: the batch is
bisected until the failing prompts are isolated, and each one gets an error message instead of
a value. Broken contracts (an engine that does not return the six digit log-probabilities, a
dead engine) raise, because no row could be scored correctly.

Example:
    >>> backend = load_backend(model_cfg, "/path/to/model", "score")  # doctest: +SKIP
    >>> logits, errors = backend.digit_logits([[1, 42, 7]], digit_ids)  # doctest: +SKIP
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deita_ray.config import ModelConfig

TASKS = ("score", "embed")


class BackendContractError(RuntimeError):
    """The engine broke an assumption every result depends on; never turned into a row reject."""


def resolve_dtype(dtype: str) -> str:
    """'auto' -> 'bfloat16' on a CUDA machine, 'float32' on CPU; other values unchanged."""
    if dtype != "auto":
        return dtype
    import torch  # noqa: PLC0415 - heavy, only on workers

    return "bfloat16" if torch.cuda.is_available() else "float32"


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
        tokenizer: the HF tokenizer prompts must be encoded with.
        hidden_size: embedding dimension (the model's hidden size).
    """

    name = "base"

    def __init__(self, cfg: ModelConfig, path: str, task: str):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.cfg = cfg
        self.path = path
        self.task = task
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
        """``(n, 6)`` logits or log-probabilities of the digit tokens after each prompt."""

    @abstractmethod
    def _last_hidden(self, prompts: list[list[int]]) -> np.ndarray:
        """``(n, hidden_size)`` float32 final hidden states at each prompt's last token."""

    def _fatal(self, exc: BaseException) -> bool:
        """Whether an exception means the engine itself is unusable (re-raised)."""
        return isinstance(exc, (BackendContractError, MemoryError))

    def digit_logits(
        self, prompts: Sequence[list[int]], digit_ids: list[int]
    ) -> tuple[np.ndarray, list[str | None]]:
        """Digit logits of every prompt, in one engine call when nothing fails.

        Returns:
            ``(values (n, 6) float64 with NaN rows where failed, errors: None or message)``.
        """
        if self.task != "score":
            raise RuntimeError("this backend was loaded for embedding, not scoring")
        return self._isolate(lambda ps: self._digit_logits(ps, digit_ids), list(prompts), 6)

    def embed(self, prompts: Sequence[list[int]]) -> tuple[np.ndarray, list[str | None]]:
        """Last-token final hidden states of every prompt, in one engine call when nothing fails.

        Returns:
            ``(values (n, hidden_size) float32 with NaN rows where failed, errors)``.
        """
        if self.task != "embed":
            raise RuntimeError("this backend was loaded for scoring, not embedding")
        return self._isolate(self._last_hidden, list(prompts), self.hidden_size)

    def _isolate(
        self, fn: Callable[[list[list[int]]], np.ndarray], prompts: list[list[int]], width: int
    ) -> tuple[np.ndarray, list[str | None]]:
        out = np.full((len(prompts), width), np.nan, dtype=np.float64)
        errors: list[str | None] = [None] * len(prompts)
        if not prompts:
            return out, errors

        def run(lo: int, hi: int) -> None:
            try:
                vals = np.asarray(fn(prompts[lo:hi]), dtype=np.float64)
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
            if vals.shape != (hi - lo, width):
                raise BackendContractError(
                    f"{self.name} backend returned shape {vals.shape}, expected {(hi - lo, width)}"
                )
            out[lo:hi] = vals

        run(0, len(prompts))
        return out, errors

    def close(self) -> None:
        """Release the engine (best effort; subclasses free their engine)."""
        self.closed = True


def load_backend(cfg: ModelConfig, path: str, task: str) -> Backend:
    """Build the backend named by ``cfg.backend`` for ``task`` on a local model folder.

    Args:
        cfg: the model config (backend, dtype, context length, engine options).
        path: the model folder, already resolved by
            :func:`deita_ray.models.registry.resolve_model_path`.
        task: "score" or "embed".
    """
    if cfg.backend == "vllm":
        from deita_ray.models.vllm_backend import VLLMBackend  # noqa: PLC0415

        return VLLMBackend(cfg, path, task)
    if cfg.backend == "hf":
        from deita_ray.models.hf_backend import HFBackend  # noqa: PLC0415

        return HFBackend(cfg, path, task)
    raise ValueError(f"unknown backend {cfg.backend!r} (allowed: vllm, hf)")

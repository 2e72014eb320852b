"""vLLM backend: scoring by one prefill per prompt (``max_tokens=1`` restricted to the six
digit tokens, their processed log-probabilities read back), embedding with the pooling runner
(LAST pooling, no activation / normalisation). vLLM is imported only when a backend is built.
"""

from __future__ import annotations

import numpy as np

from deita_ray.config import ModelConfig
from deita_ray.models.backend import Backend, BackendContractError


def digit_logprobs(outputs: list, digit_ids: list[int]) -> np.ndarray:
    """``(n, 6)`` log-probabilities of the digit ids from vLLM ``RequestOutput`` objects.

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
                "logprobs_mode='processed_logprobs' and return logprobs=6"
            )
        rows[i] = [lps[0][t].logprob for t in digit_ids]
    return rows


class VLLMBackend(Backend):
    """A vLLM ``LLM`` engine for one task (see :class:`deita_ray.models.backend.Backend`)."""

    name = "vllm"

    def __init__(self, cfg: ModelConfig, path: str, task: str):
        super().__init__(cfg, path, task)
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
        else:
            from vllm.config import PoolerConfig  # noqa: PLC0415

            kwargs.update(
                runner="pooling",
                convert="embed",
                pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False),
            )
        self.llm = LLM(**kwargs)
        self.hidden_size = int(self.llm.llm_engine.model_config.get_hidden_size())
        self._sampling = None

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

    def _last_hidden(self, prompts: list[list[int]]) -> np.ndarray:
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        outs = self.llm.embed([TokensPrompt(prompt_token_ids=p) for p in prompts], use_tqdm=False)
        return np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)

    def _fatal(self, exc: BaseException) -> bool:
        try:
            from vllm.v1.engine.exceptions import EngineDeadError  # noqa: PLC0415
        except ImportError:  # pragma: no cover - other vLLM layouts
            EngineDeadError = ()  # noqa: N806
        return super()._fatal(exc) or isinstance(exc, EngineDeadError)

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            # Stops the engine-core subprocess now rather than at garbage collection.
            llm.llm_engine.engine_core.shutdown()
        super().close()

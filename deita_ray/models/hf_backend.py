"""transformers backend: batched forward with right padding; logits (scoring) or the final
hidden state after the final norm (embedding) taken at each prompt's last real token.

Only the selected positions go through the LM head, so scoring a long prompt costs one
prefill and a ``6 x hidden`` product, never the full-vocabulary logits of every position.
"""

from __future__ import annotations

import numpy as np

from deita_ray.config import ModelConfig
from deita_ray.models.backend import Backend


class HFBackend(Backend):
    """A transformers causal LM for one task (see :class:`deita_ray.models.backend.Backend`)."""

    name = "hf"

    def __init__(self, cfg: ModelConfig, path: str, task: str):
        super().__init__(cfg, path, task)
        import torch  # noqa: PLC0415 - heavy, only on workers
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, self.dtype), trust_remote_code=cfg.trust_remote_code
        )
        self.model = model.to(self.device).eval()
        self.body = self.model.get_decoder()  # the base model: hidden states after final norm
        self.head = self.model.get_output_embeddings()
        self.hidden_size = int(self.model.config.get_text_config().hidden_size)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)  # masked out, any id works

    def _batches(self, prompts: list[list[int]]):
        """Yield (indices, last hidden state at each prompt's last token) per forward batch."""
        torch = self.torch
        for p in prompts:
            if not p:
                raise ValueError("empty prompt")
            if len(p) > self.cfg.max_model_len:
                raise ValueError(
                    f"prompt has {len(p)} tokens > max_model_len {self.cfg.max_model_len}"
                )
        # Similar lengths together: less padding; results do not depend on the grouping.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        bs = self.cfg.hf_batch_size
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            lens = [len(prompts[i]) for i in idx]
            width = max(lens)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : lens[row]] = torch.tensor(prompts[i], dtype=torch.long)
                mask[row, : lens[row]] = 1
            with torch.inference_mode():
                hidden = self.body(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state
                last = hidden[
                    torch.arange(len(idx), device=hidden.device),
                    torch.tensor(lens, device=hidden.device) - 1,
                ]
            yield idx, last

    def _digit_logits(self, prompts: list[list[int]], digit_ids: list[int]) -> np.ndarray:
        torch = self.torch
        out = np.empty((len(prompts), len(digit_ids)), dtype=np.float64)
        digits = torch.tensor(digit_ids, device=self.device)
        for idx, last in self._batches(prompts):
            with torch.inference_mode():
                logits = self.head(last)[:, digits]
            out[idx] = logits.float().cpu().numpy()
        return out

    def _last_hidden(self, prompts: list[list[int]]) -> np.ndarray:
        out = np.empty((len(prompts), self.hidden_size), dtype=np.float32)
        for idx, last in self._batches(prompts):
            out[idx] = last.float().cpu().numpy()
        return out

    def close(self) -> None:
        for name in ("model", "body", "head"):
            if hasattr(self, name):
                delattr(self, name)

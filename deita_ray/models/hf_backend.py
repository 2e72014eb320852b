"""transformers backend: batched forward with right padding; logits (scoring) taken at each
prompt's last real token, the final hidden states after the final norm pooled into one vector
(embedding: the last real token, the mean over real tokens, or the first token), and per-token
log-probabilities of the positions a caller asks for. An embedder that is not a causal LM (a
sentence-transformers BERT) is loaded as a plain encoder (``AutoModel``).

Only the selected positions go through the LM head, so scoring a long prompt costs one
prefill and a ``6 x hidden`` product, never the full-vocabulary logits of every position;
token log-probabilities pass only the requested positions through the head, in chunks.
"""

from __future__ import annotations

import numpy as np

from deita_ray.config import ModelConfig
from deita_ray.models.backend import Backend


class HFBackend(Backend):
    """A transformers causal LM for one task (see :class:`deita_ray.models.backend.Backend`)."""

    name = "hf"
    LOGPROB_CHUNK = 1024
    """Positions per LM-head call in :meth:`_token_logprobs` (bounds the fp32 logits memory)."""

    def __init__(self, cfg: ModelConfig, path: str, task: str, pooling: str = "last"):
        super().__init__(cfg, path, task, pooling)
        import torch  # noqa: PLC0415 - heavy, only on workers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: PLC0415

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        load = {"dtype": getattr(torch, self.dtype), "trust_remote_code": cfg.trust_remote_code}
        archs = AutoConfig.from_pretrained(path, **load).architectures or []
        causal = task != "embed" or any(a.endswith("ForCausalLM") for a in archs)
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, **load)
        self.model = model.to(self.device).eval()
        # The base model: hidden states after the final norm (an encoder is its own body).
        self.body = self.model.get_decoder() if causal else self.model
        self.head = self.model.get_output_embeddings()
        self.hidden_size = int(self.model.config.get_text_config().hidden_size)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)  # masked out, any id works

    def _hidden_batches(self, prompts: list[list[int]]):
        """Yield (indices, lengths, final hidden states ``(b, width, hidden)``) per forward batch."""
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
            yield idx, lens, hidden

    def _batches(self, prompts: list[list[int]]):
        """Yield (indices, last hidden state at each prompt's last token) per forward batch."""
        torch = self.torch
        for idx, lens, hidden in self._hidden_batches(prompts):
            with torch.inference_mode():
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

    def _pooled_hidden(self, prompts: list[list[int]]) -> np.ndarray:
        torch = self.torch
        out = np.empty((len(prompts), self.hidden_size), dtype=np.float32)
        if self.pooling == "last":
            for idx, last in self._batches(prompts):
                out[idx] = last.float().cpu().numpy()
            return out
        for idx, lens, hidden in self._hidden_batches(prompts):
            with torch.inference_mode():
                if self.pooling == "cls":
                    pooled = hidden[:, 0].float()
                else:  # mean over the real tokens, in fp32 (as sentence-transformers does)
                    n = torch.tensor(lens, device=hidden.device)
                    mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < n[:, None]
                    pooled = (hidden.float() * mask[..., None]).sum(1) / n[:, None]
            out[idx] = pooled.cpu().numpy()
        return out

    def _token_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[np.ndarray]:
        torch = self.torch
        out: list[np.ndarray] = [np.empty(0)] * len(sequences)
        for idx, lens, hidden in self._hidden_batches(sequences):
            # The hidden state at position j-1 predicts token j: only those rows go through the
            # LM head, in chunks, so a long batch never holds (b, width, vocab) logits at once.
            rows, targets, owners = [], [], []
            for row, i in enumerate(idx):
                s = starts[i]
                rows.append(hidden[row, s - 1 : lens[row] - 1])
                targets.extend(sequences[i][s:])
                owners.append((i, lens[row] - s))
            picked = torch.cat(rows) if rows else hidden.new_zeros((0, hidden.shape[-1]))
            tgt = torch.tensor(targets, dtype=torch.long, device=picked.device)
            vals = torch.empty(len(targets), dtype=torch.float32)
            with torch.inference_mode():
                for c in range(0, len(targets), self.LOGPROB_CHUNK):
                    logits = self.head(picked[c : c + self.LOGPROB_CHUNK])
                    lp = torch.log_softmax(logits.float(), dim=-1)  # fp32 whatever the dtype
                    sel = lp.gather(1, tgt[c : c + self.LOGPROB_CHUNK, None])[:, 0]
                    vals[c : c + len(sel)] = sel.cpu()
            flat = vals.numpy().astype(np.float64)
            pos = 0
            for i, n in owners:
                out[i] = flat[pos : pos + n]
                pos += n
        return out

    def _generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[str]:
        torch = self.torch
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        out: list[str] = [""] * len(prompts)
        # Left padding, similar lengths and equal budgets together; greedy is per row exact.
        order = sorted(range(len(prompts)), key=lambda i: (max_tokens[i], len(prompts[i])))
        bs = self.cfg.hf_batch_size
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                if not prompts[i]:
                    raise ValueError("empty prompt")
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.long)
                mask[row, width - len(prompts[i]) :] = 1
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max(max_tokens[i] for i in idx),
                    do_sample=False,
                    pad_token_id=self.pad_id,
                    eos_token_id=eos,
                )
            for row, i in enumerate(idx):
                new = gen[row, width : width + max_tokens[i]].tolist()
                stops = {eos} if isinstance(eos, int) else set(eos or [])
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                out[i] = self.tokenizer.decode(new[:cut], skip_special_tokens=True)
        return out

    def close(self) -> None:
        for name in ("model", "body", "head"):
            if hasattr(self, name):
                delattr(self, name)

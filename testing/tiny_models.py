"""Tiny random LLaMA models built on the fly, for tests and benchmarks (nothing downloaded).

The vLLM CPU engine needs head_dim 64, so the default is hidden 128 with 2 heads. The tokenizer
is a byte-level BPE trained in a fraction of a second on a built-in corpus: it encodes any text,
its digits 1..6 are single tokens, and it has BOS/EOS/PAD tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

_CORPUS = [
    "You are a helpful assistant. Please identify the complexity score of the following user query.",
    "Please identify the quality score of the Response corresponding to the Question.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "Give three tips for staying healthy. Eat a balanced diet, exercise, and sleep well.",
    "Write a poem about the ocean. Explain how photosynthesis works in plants.",
    "##Query: ##Complexity: #Question#: #Response#: ##Quality: 1 2 3 4 5 6 7 8 9 0",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "def add(a, b): return a + b  # code, numbers 12345, symbols !?.,;:()[]{}<>/\\'\"",
]


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512):
    """Train and save a byte-level BPE tokenizer; return the PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    vocab_size: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Write a random LlamaForCausalLM plus tokenizer to ``out_dir`` (safetensors).

    Args:
        vocab_size: rows of the embedding and the LM head; default the tokenizer's size (a
            larger one gives a model the cost of a real vocabulary; its extra ids never occur).
        dtype: weights as saved ("float32", "bfloat16").
        device: where the weights are initialised ("cuda" builds a 1B model in a second).

    Returns:
        The folder, loadable by transformers and by vLLM.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    # Spread the logits a little so that scores differ visibly between prompts.
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0) if not tie_word_embeddings else None
    model.to(device="cpu", dtype=getattr(torch, dtype)).save_pretrained(
        str(out), safe_serialization=True
    )
    return out

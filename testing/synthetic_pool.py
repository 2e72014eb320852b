"""A synthetic mixed-format instruction pool of any size, for benchmarks and scale tests.

Records rotate through Alpaca (with and without input), ShareGPT multi-turn with ids, OpenAI
messages with a system prompt and Dolly, with a few bad rows (invalid JSON, blank instruction)
and planted duplicate ids, over files that rotate through JSON arrays, JSON lines and gzipped
JSON lines. Texts are sentences drawn from a small vocabulary: the pool exercises formats,
throughput and memory, not data quality. Deterministic for a given seed.
"""

from __future__ import annotations

import gzip
import json
import os
import random

WORDS = [
    "data",
    "model",
    "train",
    "answer",
    "question",
    "explain",
    "simple",
    "write",
    "list",
    "code",
    "python",
    "function",
    "value",
    "energy",
    "planet",
    "river",
    "music",
    "history",
    "science",
    "market",
    "price",
    "network",
    "system",
    "user",
    "memory",
    "result",
    "method",
    "number",
    "letter",
    "story",
    "poem",
    "summary",
    "reason",
    "example",
    "step",
    "first",
    "second",
    "final",
    "because",
    "therefore",
    "however",
    "quickly",
    "carefully",
    "small",
    "large",
    "bright",
    "quiet",
    "ancient",
    "modern",
]


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + "."


def _record(rng: random.Random, file_no: int, i: int) -> dict | str:
    r = rng.random()
    if r < 0.001:
        return '{"instruction": "broken'  # invalid JSON (JSONL) / kept as a string (arrays)
    if r < 0.002:
        return {"instruction": "   ", "output": "blank instruction"}
    if r < 0.40:
        rec = {"instruction": _sentence(rng, 4, 14), "input": "", "output": _sentence(rng, 8, 50)}
        if rng.random() < 0.4:
            rec["input"] = _sentence(rng, 4, 20)
        return rec
    if r < 0.70:
        conv = []
        for _ in range(rng.randint(1, 3)):
            conv.append({"from": "human", "value": _sentence(rng, 4, 14)})
            conv.append({"from": "gpt", "value": _sentence(rng, 8, 40)})
        # ~0.05% of ids repeat an earlier id of the same file: planted duplicates
        rid = f"sg-{file_no}-{i if rng.random() > 0.0005 else i // 2}"
        return {"id": rid, "conversations": conv}
    if r < 0.85:
        msgs = [{"role": "system", "content": "You are a helpful assistant."}]
        msgs += [
            {"role": "user", "content": _sentence(rng, 4, 14)},
            {"role": "assistant", "content": _sentence(rng, 8, 50)},
        ]
        return {"messages": msgs, "source": "synthetic"}
    return {
        "instruction": _sentence(rng, 4, 12),
        "context": _sentence(rng, 0, 30),
        "response": _sentence(rng, 8, 40),
        "category": rng.choice(["open_qa", "closed_qa", "summarization"]),
    }


def generate_pool(folder: str, rows: int, files: int, seed: int = 0) -> list[str]:
    """Write ``rows`` records over ``files`` files in ``folder``; return the file paths."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    kinds = [".json", ".jsonl", ".jsonl.gz"]
    paths = []
    per_file = [rows // files + (1 if k < rows % files else 0) for k in range(files)]
    for k, n in enumerate(per_file):
        ext = kinds[k % len(kinds)]
        path = os.path.join(folder, f"pool_{k:02d}{ext}")
        opener = gzip.open if ext.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            if ext == ".json":
                f.write("[\n")
            for i in range(n):
                rec = _record(rng, k, i)
                if ext == ".json":
                    text = json.dumps(rec if isinstance(rec, dict) else {"broken": rec})
                    f.write(text + (",\n" if i < n - 1 else "\n"))
                else:
                    f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
            if ext == ".json":
                f.write("]\n")
        paths.append(path)
    return paths

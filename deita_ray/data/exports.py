"""Canonical rows -> the record shapes trainers read (pure functions, no Ray, no I/O).

- ``sharegpt``: ``{"id", "conversations": [{"from": "system"|"human"|"gpt", "value"}]}``
  (FastChat, LLaMA-Factory ``formatting: sharegpt``, axolotl ``type: sharegpt``);
- ``messages``: ``{"id", "messages": [{"role", "content"}]}`` (OpenAI chat format: TRL's
  ``SFTTrainer``, axolotl ``type: chat_template``);
- ``alpaca``: ``{"id", "instruction", "input": "", "output", "system", "history": [[user,
  assistant], ...]}`` (LLaMA-Factory's Alpaca with ``system`` and ``history``): a row is one
  optional leading system message, then user/assistant pairs; the last pair is
  ``instruction``/``output``, the earlier ones ``history``. Other rows (a reply before the first
  question, two replies in a row, a question without a reply, a system message elsewhere, an
  empty system message, which Alpaca cannot tell from none) cannot be written as Alpaca:
  :func:`export_record` returns a :class:`~deita_ray.data.formats.Reject` with reason
  ``not_alpaca_shape``.

Lossless: the row's ``extra`` fields (the input fields the canonical row does not represent)
are written at the top level of the record, so ingesting an export gives the same canonical
rows (``id``, ``messages``, ``extra``): see docs/report.md, "Exports". Two exceptions, both
reported: an extra field named like one the format reads (e.g. ``conversations`` kept because
its messages had more keys) is left out, since writing it would change what ingest reads; and
a field whose JSON type differs between rows is made one type (:func:`unify_types`), since
trainers load these files as one table.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from deita_ray.data.formats import Reject

EXPORT_FORMATS = ("sharegpt", "messages", "alpaca")
"""Record shapes :func:`export_record` writes."""

SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}

RESERVED = {
    "sharegpt": frozenset({"conversations"}),
    "messages": frozenset({"conversations", "messages"}),
    "alpaca": frozenset(
        {
            "conversations",
            "messages",
            "instruction",
            "input",
            "output",
            "system",
            "history",
            "instances",
            "response",
            "context",
            "chosen",
        }
    ),
}
"""Per format, the top-level fields that decide how ingest reads a record (its own fields
and those that would make ingest detect another shape): extra fields with these names are
not written."""

FILE_NAMES = {f: f"{f}.jsonl" for f in EXPORT_FORMATS}


def _sharegpt(messages: Sequence[Mapping[str, str]]) -> dict | Reject:
    return {
        "conversations": [
            {"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages
        ]
    }


def _messages(messages: Sequence[Mapping[str, str]]) -> dict | Reject:
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def _pairs_problem(messages: Sequence[Mapping[str, str]]) -> str | None:
    """Why the messages are not an optional leading system message followed by
    user/assistant pairs (None when they are)."""
    roles = [m["role"] for m in messages]
    rest = roles[1:] if roles[:1] == ["system"] else roles
    if rest and len(rest) % 2 == 0 and rest == ["user", "assistant"] * (len(rest) // 2):
        return None
    return "messages are not [system] followed by user/assistant pairs: roles " + ",".join(roles)


def _alpaca(messages: Sequence[Mapping[str, str]]) -> dict | Reject:
    problem = _pairs_problem(messages)
    if problem is not None:
        return Reject("not_alpaca_shape", problem)
    rest = list(messages)
    system = rest.pop(0)["content"] if rest[0]["role"] == "system" else None
    if system == "":
        return Reject("not_alpaca_shape", "an empty system message (Alpaca cannot keep it)")
    pairs = [[rest[i]["content"], rest[i + 1]["content"]] for i in range(0, len(rest), 2)]
    *history, (instruction, output) = pairs
    return {
        "instruction": instruction,
        "input": "",
        "output": output,
        "system": system or "",
        "history": history,
    }


CONVERTERS = {"sharegpt": _sharegpt, "messages": _messages, "alpaca": _alpaca}


def export_record(
    row_id: str | None, messages: Sequence[Mapping[str, str]], extra: str | None, fmt: str
) -> tuple[dict, list[str]] | Reject:
    """One canonical row as a record of ``fmt``.

    Args:
        row_id: the row's id (written as ``id`` unless an ``id`` extra field holds the input's
            own, e.g. an integer id, which ingest reads back to the same id).
        messages: canonical messages (``role``, ``content``).
        extra: the row's ``extra`` column (a JSON object, or None).
        fmt: one of :data:`EXPORT_FORMATS`.

    Returns:
        (record, names of extra fields left out), or a :class:`Reject`.
    """
    body = CONVERTERS[fmt](messages)
    if isinstance(body, Reject):
        return body
    fields = json.loads(extra) if extra else {}
    if not isinstance(fields, dict):
        fields = {}
    dropped = sorted(k for k in fields if k in RESERVED[fmt])
    record: dict[str, Any] = {k: v for k, v in fields.items() if k not in RESERVED[fmt]}
    if "id" not in record and row_id is not None:
        record = {"id": row_id, **record}
    record.update(body)
    return record, dropped


def _json_kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), "other")


def unify_types(records: Sequence[dict], row_ids: Sequence[str]) -> dict[str, int]:
    """Make every top-level field one JSON type across ``records`` (in place): a field whose
    values have several types (integer ids in one input file, text ids in another) cannot be
    one column for ``datasets`` / pyarrow, so ``id`` becomes the row's id text there and any
    other such field is left out.

    Returns:
        Per field, the records it was changed in (the id) or left out of.
    """
    kinds: dict[str, set[str]] = {}
    for record in records:
        for key, value in record.items():
            kind = _json_kind(value)
            if kind is not None:
                kinds.setdefault(key, set()).add(kind)
    mixed = {k for k, s in kinds.items() if len(s) > 1}
    changed: Counter = Counter()
    for record, row_id in zip(records, row_ids, strict=True):
        for key in mixed & record.keys():
            if key == "id":
                if record["id"] != row_id:
                    record["id"] = row_id
                    changed["id"] += 1
            elif record[key] is not None:  # a null fits any column type
                del record[key]
                changed[key] += 1
    return dict(changed)


def llamafactory_ready(messages: Sequence[Mapping[str, str]]) -> bool:
    """Whether LLaMA-Factory's ShareGPT reader takes the row (it skips any other): an optional
    leading system message, then user/assistant pairs."""
    return _pairs_problem(messages) is None


def dataset_info(name: str, formats: Sequence[str]) -> dict[str, dict]:
    """LLaMA-Factory ``dataset_info.json`` entries (``<name>_<format>``) for the exported
    files it reads: ShareGPT and Alpaca (its default tags and columns, spelled out)."""
    info: dict[str, dict] = {}
    if "sharegpt" in formats:
        info[f"{name}_sharegpt"] = {
            "file_name": FILE_NAMES["sharegpt"],
            "formatting": "sharegpt",
            "columns": {"messages": "conversations"},
            "tags": {
                "role_tag": "from",
                "content_tag": "value",
                "user_tag": "human",
                "assistant_tag": "gpt",
                "system_tag": "system",
                "observation_tag": "observation",
                "function_tag": "function_call",
            },
        }
    if "alpaca" in formats:
        info[f"{name}_alpaca"] = {
            "file_name": FILE_NAMES["alpaca"],
            "formatting": "alpaca",
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
                "system": "system",
                "history": "history",
            },
        }
    return info

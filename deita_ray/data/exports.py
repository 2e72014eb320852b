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
a field whose values do not share one type, at any depth, as a column of a JSON reader sees
them (``tags: ["seed", 0]``: a list of strings and numbers; a number in one row and text in
another) is made one type (:func:`unify_types`): trainers load these files as one table
(``datasets``, ``pyarrow.json``), and such a field stops the whole file from loading.
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


class _Mixed(Exception):
    """Values that no one column type holds."""


def _merge(a: Any, b: Any) -> Any:
    """The type that holds values of types ``a`` and ``b`` (see :func:`column_type`)."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    if isinstance(a, str) or isinstance(b, str) or a[0] != b[0]:
        raise _Mixed
    if a[0] == "list":
        return ("list", _merge(a[1], b[1]))
    keys = {**a[1], **b[1]}
    return ("object", {k: _merge(a[1].get(k), b[1].get(k)) for k in keys})


def column_type(value: Any) -> Any:
    """A JSON value's type as a JSON reader builds a column of it (``pyarrow.json``, which
    ``datasets`` uses): ``None`` (null: fits any type), ``"bool"``, ``"number"`` (integers and
    floats share a column), ``"string"``, ``("list", element type)``, ``("object", {key:
    type})`` (keys may differ between values: missing ones are null).

    Raises:
        _Mixed: the value itself holds what no one column holds (``["seed", 0]``).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        element = None
        for item in value:
            element = _merge(element, column_type(item))
        return ("list", element)
    if isinstance(value, dict):
        return ("object", {k: column_type(v) for k, v in value.items()})
    raise _Mixed


def unify_types(records: Sequence[dict], row_ids: Sequence[str]) -> dict[str, int]:
    """Make every top-level field one column type across ``records`` (in place).

    A field whose values no one column type holds (:func:`column_type`: integer ids in one
    input file and text ids in another, ``tags: ["seed", 0]``, an object whose ``score`` is a
    number here and text there) would make ``datasets`` / ``pyarrow.json`` refuse the file. There
    ``id`` becomes the row's id text, and any other such field is written as its JSON text in
    every record that has it (``'["seed", 0]'``; ``json.loads`` gives the value back).

    Returns:
        Per field changed, the records it was changed in.
    """
    types: dict[str, Any] = {}
    mixed: set[str] = set()
    for record in records:
        for key, value in record.items():
            if key in mixed:
                continue
            try:
                types[key] = _merge(types.get(key), column_type(value))
            except _Mixed:
                mixed.add(key)
    changed: Counter = Counter()
    for record, row_id in zip(records, row_ids, strict=True):
        for key in mixed & record.keys():
            if key == "id":
                if record["id"] != row_id:
                    record["id"] = row_id
                    changed["id"] += 1
            elif record[key] is not None:  # a null fits any column type
                record[key] = json.dumps(record[key], ensure_ascii=False)
                changed[key] += 1
    return dict(changed)


def llamafactory_ready(messages: Sequence[Mapping[str, str]]) -> bool:
    """Whether LLaMA-Factory's ShareGPT reader takes the row (it skips any other): an optional
    leading system message, then user/assistant pairs."""
    return _pairs_problem(messages) is None


def dataset_info(name: str, formats: Sequence[str]) -> dict[str, dict]:
    """LLaMA-Factory ``dataset_info.json`` entries (``<name>_<format>``), one per exported
    file: ShareGPT, OpenAI messages (LLaMA-Factory's ``sharegpt`` formatting with the OpenAI
    tags) and Alpaca, their tags and columns spelled out."""
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
    if "messages" in formats:
        info[f"{name}_messages"] = {
            "file_name": FILE_NAMES["messages"],
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
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

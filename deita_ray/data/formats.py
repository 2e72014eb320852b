"""Record shapes -> the canonical row of docs/data.md (pure functions, no Ray, no I/O).

A *record* is one parsed JSON object of the pool. :func:`canonicalize` turns it into the
canonical fields (``messages``, ``format``, ``extra`` and the record's own id, if any) or into a
:class:`Reject` with a machine-readable reason. :func:`extract_turns` splits canonical messages
into (instruction, response) turns for the scorers.

Every record shape is one :class:`RecordFormat` in :data:`RECORD_FORMATS` (name -> how to
detect it, how to convert it); the config's ``input.format`` choices come from it, so a new shape
is one :func:`register_format` call.

Shapes (``format="auto"`` detects them per record, in this order):

- ``sharegpt``: ``conversations`` = [{``from``, ``value``}] (``role``/``content`` keys are
  accepted too).
- ``messages``: OpenAI ``messages`` = [{``role``, ``content``}] (``from``/``value`` accepted too).
- ``self_instruct``: ``instruction`` + ``instances`` = [{``input``, ``output``}]; the first
  instance is the turn (instruction and input joined like Alpaca); if there are several, the
  whole ``instances`` list is also kept in ``extra``.
- ``dolly``: ``instruction``, optional ``context``, ``response`` (context joined like Alpaca input).
- ``alpaca``: ``instruction``, optional ``input``, ``output``; instruction and input joined by
  ``"\\n\\n"`` when input is non-empty; LLaMA-Factory's optional ``system`` (a leading system
  message) and ``history`` (a list of [user, assistant] pairs that precede the instruction).
  A record with ``instruction`` but neither ``output``, ``response`` nor ``instances`` is
  rejected with ``missing_field``.
- ``hh``: Anthropic HH-RLHF transcripts (``chosen`` is a string of ``"\\n\\nHuman: ..."`` /
  ``"\\n\\nAssistant: ..."`` blocks): the ``chosen`` transcript becomes the messages; ``rejected``
  stays in ``extra``.

Anything else is ``unknown_format`` (e.g. prompt-only evaluation files: they have no response
to learn from).

Roles: the aliases of :data:`ROLE_ALIASES` (case-insensitive) are always known; ``role_map``
(config ``input.role_map``) adds or overrides names (``{"function_call": "assistant",
"observation": "user"}``). Any other role rejects the row with ``unsupported_role``: tool calls
and tool outputs are not silently merged into the chat, the user decides how to map them.

Validation (reject reasons): ``not_an_object``, ``unknown_format``, ``missing_field``,
``wrong_type`` (non-string content, non-list conversation, ...), ``empty_conversation`` (no
message, or no user message, i.e. no turn), ``empty_instruction`` (a whitespace-only user
message), ``consecutive_user_turns`` (two user messages in a row, system messages between
them ignored), ``unsupported_role``. Empty or whitespace-only assistant replies are allowed
(real Alpaca has some); the turn's response is then that text.

Ids: the record's own ``id_field`` (default ``id``) when it is a non-empty string or an
integer (``str(int)``); the caller falls back to ``<file stem>:<index>``.

Lossless ``extra``: every top-level field that the canonical fields do not represent goes to
``extra`` unchanged (a JSON object). Consumed fields are the shape's own fields (``conversations``,
``instruction``/``input``/``output``, ``system``, ``history``, ...) and the id field when it was a
string used verbatim as the id (an integer id stays in ``extra`` so its type is not lost). If
messages carry keys beyond role/content (e.g. ``name``, ``weight``), the original message list is
kept in ``extra`` under its original key. For ``hh`` the ``chosen`` text is kept in ``extra`` if
it cannot be rebuilt exactly from the messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
"""Arrow type of one canonical message."""

CANONICAL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("seq", pa.int64()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("source", pa.string()),
        ("format", pa.string()),
        ("extra", pa.large_string()),
    ]
)
"""Schema of the ingest stage's accepted rows (docs/data.md).

``seq`` is the global input-order key (file rank in the sorted expansion x 2**40 + record
index in the file); ``extra`` is a JSON object with every input field not represented by the
other columns."""

ROLES = ("system", "user", "assistant")
"""The only roles of canonical messages."""

ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "bot": "assistant",
}
"""Role names known without configuration (lower-cased lookup)."""


class Reject(NamedTuple):
    """Why a record cannot become a canonical row."""

    reason: str
    detail: str


def _reject(reason: str, detail: str) -> Reject:
    return Reject(reason, detail)


def record_id(record: Mapping[str, Any], id_field: str = "id") -> str | None:
    """The record's own id: a non-empty (non-blank) string, or an integer as text; else None."""
    value = record.get(id_field)
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _map_role(raw: Any, role_map: Mapping[str, str] | None) -> str | None:
    if not isinstance(raw, str):
        return None
    if role_map and raw in role_map:
        return role_map[raw]
    low = raw.lower()
    if role_map and low in role_map:
        return role_map[low]
    return ROLE_ALIASES.get(low)


def _convert_messages(
    items: Any, field: str, role_map: Mapping[str, str] | None
) -> tuple[list[dict], bool] | Reject:
    """[{from|role, value|content}] -> canonical messages; second value: extra keys were seen."""
    if not isinstance(items, list):
        return _reject("wrong_type", f"'{field}' is {type(items).__name__}, not a list")
    out = []
    extra_keys = False
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            return _reject("wrong_type", f"{field}[{i}] is {type(m).__name__}, not an object")
        # ShareGPT keys first, OpenAI keys second, whatever the shape's name.
        role_key = next((k for k in ("from", "role") if k in m), None)
        if role_key is None:
            return _reject("missing_field", f"{field}[{i}] has no 'from'/'role'")
        content_key = next((k for k in ("value", "content") if k in m), None)
        if content_key is None:
            return _reject("missing_field", f"{field}[{i}] has no 'value'/'content'")
        raw_role = m[role_key]
        role = _map_role(raw_role, role_map)
        if role is None:
            if not isinstance(raw_role, str):
                return _reject("wrong_type", f"{field}[{i}].{role_key} is not a string")
            return _reject(
                "unsupported_role",
                f"{field}[{i}] has role {raw_role!r} (map it with input.role_map)",
            )
        content = m[content_key]
        if not isinstance(content, str):
            return _reject(
                "wrong_type",
                f"{field}[{i}].{content_key} is {type(content).__name__}, not a string",
            )
        if len(m) > 2:
            extra_keys = True
        out.append({"role": role, "content": content})
    return out, extra_keys


def validate_messages(messages: list[dict]) -> Reject | None:
    """Check the docs/data.md rules on canonical messages; None when they hold."""
    if not messages:
        return _reject("empty_conversation", "no messages")
    prev = None
    n_user = 0
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            continue
        if role == "user":
            n_user += 1
            if not m["content"].strip():
                return _reject("empty_instruction", f"message {i} is an empty user message")
            if prev == "user":
                return _reject(
                    "consecutive_user_turns", f"message {i} follows another user message"
                )
        prev = role
    if n_user == 0:
        return _reject("empty_conversation", "no user message, so no turn")
    return None


def parse_messages(
    value: Any, field: str = "messages", role_map: Mapping[str, str] | None = None
) -> list[dict] | Reject:
    """A message list as a later stage or a preference file holds it -> canonical messages.

    Accepts a list of ``{role|from, content|value}`` objects (roles through
    :data:`ROLE_ALIASES` and ``role_map``), or its JSON text. Checks the shape and types of the
    messages only; the conversation rules are :func:`validate_messages`.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            return _reject("invalid_json", f"'{field}': {e}")
    res = _convert_messages(value, field, role_map)
    return res if isinstance(res, Reject) else res[0]


def _str_field(record: Mapping[str, Any], key: str, required: bool) -> str | Reject:
    if key not in record:
        return _reject("missing_field", f"no '{key}'") if required else ""
    value = record[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        return _reject("wrong_type", f"'{key}' is {type(value).__name__}, not a string")
    return value


def _join(instruction: str, extra_input: str) -> str:
    # docs/data.md: instruction and input joined by "\n\n" when input is non-empty.
    if not extra_input:
        return instruction
    if not instruction:
        return extra_input
    return instruction + "\n\n" + extra_input


def _alpaca_like(
    record: Mapping[str, Any], input_key: str, output_key: str
) -> tuple[list[dict], set[str]] | Reject:
    instruction = _str_field(record, "instruction", True)
    if isinstance(instruction, Reject):
        return instruction
    extra_input = _str_field(record, input_key, False)
    if isinstance(extra_input, Reject):
        return extra_input
    output = _str_field(record, output_key, True)
    if isinstance(output, Reject):
        if output.reason == "missing_field" and "instruction" in record:
            return _reject("missing_field", f"instruction without '{output_key}'")
        return output
    consumed = {"instruction", input_key, output_key}
    messages: list[dict] = []
    system = _str_field(record, "system", False)
    if isinstance(system, Reject):
        return system
    if "system" in record:
        consumed.add("system")
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history")
    if "history" in record:
        consumed.add("history")
    if history is not None:
        if not isinstance(history, list):
            return _reject("wrong_type", f"'history' is {type(history).__name__}, not a list")
        for i, pair in enumerate(history):
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(x, str) for x in pair)
            ):
                return _reject("wrong_type", f"history[{i}] is not a [user, assistant] string pair")
            messages.append({"role": "user", "content": pair[0]})
            messages.append({"role": "assistant", "content": pair[1]})
    messages.append({"role": "user", "content": _join(instruction, extra_input)})
    messages.append({"role": "assistant", "content": output})
    return messages, consumed


def _self_instruct(record: Mapping[str, Any]) -> tuple[list[dict], set[str]] | Reject:
    instruction = _str_field(record, "instruction", True)
    if isinstance(instruction, Reject):
        return instruction
    instances = record["instances"]
    if not isinstance(instances, list):
        return _reject("wrong_type", f"'instances' is {type(instances).__name__}, not a list")
    if not instances:
        return _reject("missing_field", "'instances' is empty: no output")
    first = instances[0]
    if not isinstance(first, dict):
        return _reject("wrong_type", "instances[0] is not an object")
    extra_input = _str_field(first, "input", False)
    if isinstance(extra_input, Reject):
        return _reject(extra_input.reason, "instances[0]: " + extra_input.detail)
    output = _str_field(first, "output", True)
    if isinstance(output, Reject):
        return _reject(output.reason, "instances[0]: " + output.detail)
    consumed = {"instruction"}
    # One instance with nothing but input/output is fully represented by the messages.
    if len(instances) == 1 and set(first) <= {"input", "output"}:
        consumed.add("instances")
    messages = [
        {"role": "user", "content": _join(instruction, extra_input)},
        {"role": "assistant", "content": output},
    ]
    return messages, consumed


_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str) -> list[dict] | Reject:
    """Split an HH-RLHF transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``) into messages."""
    parts = _HH_SPLIT.split(text)
    # parts = [before, speaker, body, speaker, body, ...]
    if parts[0].strip():
        return _reject("unknown_format", "transcript text before the first 'Human:'")
    messages = []
    for speaker, body in zip(parts[1::2], parts[2::2], strict=True):
        if body.startswith(" "):
            body = body[1:]
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": body})
    return messages


def render_hh_transcript(messages: list[dict]) -> str:
    """Inverse of :func:`parse_hh_transcript` for the usual spacing (used to test losslessness)."""
    out = []
    for m in messages:
        speaker = "Human" if m["role"] == "user" else "Assistant"
        out.append(f"\n\n{speaker}: {m['content']}" if m["content"] else f"\n\n{speaker}:")
    return "".join(out)


def _hh(record: Mapping[str, Any]) -> tuple[list[dict], set[str]] | Reject:
    chosen = record.get("chosen")
    if not isinstance(chosen, str):
        return _reject("wrong_type", "'chosen' is not a transcript string")
    messages = parse_hh_transcript(chosen)
    if isinstance(messages, Reject):
        return messages
    consumed = {"chosen"} if render_hh_transcript(messages) == chosen else set()
    return messages, consumed


# ---------------------------------------------------------------------------------------------
# The registry of record shapes

Converted = tuple[list[dict], set[str]]
"""A converted record: its canonical messages and the top-level fields they represent."""


@dataclass(frozen=True)
class RecordFormat:
    """One record shape.

    Attributes:
        name: the value of ``format`` (config ``input.format``) and of the ``format`` column.
        detect: ``detect(record) -> bool``: the record has this shape (``format="auto"`` takes
            the first registered shape that says yes).
        convert: ``convert(record, role_map) -> (messages, consumed fields) | Reject``; the
            messages are checked by :func:`validate_messages` afterwards, the fields not
            consumed go to ``extra``.
        detected_by: what ``detect`` looks for, in words (for ``--help-config``).
    """

    name: str
    detect: Callable[[Mapping[str, Any]], bool]
    convert: Callable[[Mapping[str, Any], Mapping[str, str] | None], Converted | Reject]
    detected_by: str


RECORD_FORMATS: dict[str, RecordFormat] = {}
"""Every record shape by name, in detection order."""


def register_format(shape: RecordFormat) -> RecordFormat:
    """Add a record shape (detected after the ones registered before it)."""
    if shape.name in RECORD_FORMATS or shape.name == "auto":
        raise ValueError(f"record format {shape.name!r} is already registered")
    RECORD_FORMATS[shape.name] = shape
    return shape


def detect_format(record: Mapping[str, Any]) -> str | None:
    """The name of the first registered shape that ``record`` has, or None."""
    for shape in RECORD_FORMATS.values():
        if shape.detect(record):
            return shape.name
    return None


def _chat(name: str, field: str) -> Callable[..., Converted | Reject]:
    """Converter of a shape whose ``field`` holds the message list (ShareGPT, OpenAI)."""

    def convert(
        record: Mapping[str, Any], role_map: Mapping[str, str] | None
    ) -> Converted | Reject:
        if field not in record:
            return _reject("missing_field", f"declared format {name} but no '{field}'")
        converted = _convert_messages(record[field], field, role_map)
        if isinstance(converted, Reject):
            return converted
        messages, extra_keys = converted
        # Messages with keys beyond role/content keep their original list in extra.
        return messages, set() if extra_keys else {field}

    return convert


def _declared_self_instruct(
    record: Mapping[str, Any], role_map: Mapping[str, str] | None
) -> Converted | Reject:
    if "instances" not in record:
        return _reject("missing_field", "declared format self_instruct but no 'instances'")
    return _self_instruct(record)


for _shape in (
    RecordFormat(
        "sharegpt",
        lambda r: "conversations" in r,
        _chat("sharegpt", "conversations"),
        "conversations",
    ),
    RecordFormat("messages", lambda r: "messages" in r, _chat("messages", "messages"), "messages"),
    RecordFormat(
        "self_instruct",
        lambda r: "instruction" in r and "instances" in r,
        _declared_self_instruct,
        "instruction+instances",
    ),
    RecordFormat(
        "dolly",
        lambda r: "instruction" in r and "response" in r,
        lambda r, _: _alpaca_like(r, "context", "response"),
        "instruction+response",
    ),
    RecordFormat(
        "alpaca",
        lambda r: "instruction" in r,
        lambda r, _: _alpaca_like(r, "input", "output"),
        "instruction (+output)",
    ),
    RecordFormat(
        "hh",
        lambda r: isinstance(r.get("chosen"), str) and _HH_SPLIT.search(r["chosen"]) is not None,
        lambda r, _: _hh(r),
        "chosen HH-RLHF transcript",
    ),
):
    register_format(_shape)
del _shape

FORMATS: tuple[str, ...] = tuple(RECORD_FORMATS)
"""Names of the built-in record shapes, in detection order."""


def canonicalize(
    record: Any,
    *,
    format: str = "auto",
    role_map: Mapping[str, str] | None = None,
    id_field: str = "id",
) -> dict | Reject:
    """Turn one parsed record into canonical fields, or say why not.

    Args:
        record: the parsed JSON value of one input record.
        format: a name of :data:`RECORD_FORMATS`, or ``"auto"`` to detect the shape of this
            record.
        role_map: extra role names -> ``system``/``user``/``assistant``.
        id_field: field holding the record's own id.

    Returns:
        ``{"id": own id or None, "messages": [{"role", "content"}], "format": str,
        "extra": dict}`` or a :class:`Reject`.
    """
    if not isinstance(record, dict):
        return _reject("not_an_object", f"record is {type(record).__name__}, not an object")
    if format == "auto":
        fmt = detect_format(record)
        if fmt is None:
            keys = ", ".join(sorted(map(str, record))[:8])
            return _reject("unknown_format", f"no known record shape for keys [{keys}]")
    elif format in RECORD_FORMATS:
        fmt = format
    else:
        raise ValueError(f"unknown format {format!r}; expected auto or one of {FORMATS}")
    built = RECORD_FORMATS[fmt].convert(record, role_map)
    if isinstance(built, Reject):
        return built
    messages, consumed = built
    bad = validate_messages(messages)
    if bad is not None:
        return bad
    own_id = record_id(record, id_field)
    if own_id is not None and record[id_field] == own_id:
        consumed.add(id_field)  # a string id is kept verbatim in the id column
    extra = {k: v for k, v in record.items() if k not in consumed}
    return {"id": own_id, "messages": messages, "format": fmt, "extra": extra}


def extract_turns(messages: Iterable[Any]) -> list[tuple[str, str]]:
    """Split a conversation into (instruction, response) turns (docs/data.md).

    A turn is a user message plus the assistant message that follows it (``""`` if none).
    System messages are not turns and are skipped; assistant messages before the first user
    message are skipped. Consecutive assistant messages after one user message (possible when
    ``role_map`` maps several roles onto assistant) are joined with ``"\\n\\n"`` into that
    turn's response, so no reply text escapes scoring.

    Args:
        messages: canonical messages: mappings (or ``(role, content)`` pairs) with ``role``
            and ``content`` (any iterable, e.g. a list from Arrow or a numpy object array).

    Returns:
        One ``(instruction, response)`` tuple per user message, in order.
    """
    turns: list[tuple[str, list[str]]] = []
    for m in messages:
        if isinstance(m, Mapping):
            role, content = m["role"], m["content"]
        else:
            role, content = m
        content = content or ""
        if role == "user":
            turns.append((content, []))
        elif role == "assistant" and turns:  # an assistant message before any user is skipped
            turns[-1][1].append(content)
    return [(u, "\n\n".join(replies)) for u, replies in turns]

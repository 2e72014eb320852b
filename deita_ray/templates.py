"""The scorer prompts and the vicuna_v1.1 rendering (docs/scoring.md and docs/embedding.md), byte-exact, in one place.

Scorer prompts are split into fixed template pieces and variable text fields so that a prompt
that is too long can be truncated inside its text fields, never inside the template
(:mod:`deita_ray.scoring`).

The vicuna_v1.1 rendering: ``SYSTEM + " "``, then each message as ``ROLE + ": " + content``
followed by ``" "`` after user messages and ``"</s>"`` after assistant messages.

System messages: a row's system message(s) *replace* the default system text (as FastChat does
with a conversation's own system message). Several system messages are joined with ``"\\n"``
in order; wherever they appear in the row, they are rendered only in the system slot, never as
turns. Empty messages and leading assistant messages follow FastChat / DEITA
(:func:`vicuna_segments`).

Example:
    >>> complexity_prompt("Hi")
    'You are a helpful assistant. Please identify the complexity score of the following user query. \\n##Query: Hi  \\n##Complexity: '
    >>> render_vicuna([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    "A chat between ... the user's questions. USER: Hi ASSISTANT: Hello</s>"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

COMPLEXITY_PIECES: tuple[str, str] = (
    "You are a helpful assistant. Please identify the complexity score of the following user "
    "query. \n##Query: ",
    "  \n##Complexity: ",
)
"""Complexity prompt = pieces[0] + instruction + pieces[1]."""

QUALITY_PIECES: tuple[str, str, str] = (
    "You are a helpful assistant. Please identify the quality score of the Response "
    "corresponding to the Question. \n #Question#:\n",
    "\n#Response#:\n",
    " \n##Quality: ",
)
"""Quality prompt = pieces[0] + instruction + pieces[1] + output + pieces[2]."""

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
"""Default system text of vicuna_v1.1."""

VICUNA_ROLES = {"user": "USER", "assistant": "ASSISTANT"}
VICUNA_SEP = " "
VICUNA_SEP2 = "</s>"


def interleave(pieces: Sequence[str], fields: Sequence[str]) -> str:
    """``pieces[0] + fields[0] + pieces[1] + ... + fields[-1] + pieces[-1]``."""
    if len(pieces) != len(fields) + 1:
        raise ValueError(f"{len(pieces)} template pieces need {len(pieces) - 1} fields")
    out = [pieces[0]]
    for text, piece in zip(fields, pieces[1:], strict=True):
        out.append(text)
        out.append(piece)
    return "".join(out)


def complexity_prompt(instruction: str) -> str:
    """The complexity scorer prompt of docs/scoring.md (two spaces before ``\\n##Complexity``)."""
    return interleave(COMPLEXITY_PIECES, [instruction])


def quality_prompt(instruction: str, output: str) -> str:
    """The quality scorer prompt of docs/scoring.md (a space before ``\\n##Quality``)."""
    return interleave(QUALITY_PIECES, [instruction, output])


def _role(msg: Mapping) -> str:
    return msg["role"]


def _turn_messages(messages: Sequence[Mapping], rendering: str) -> list[tuple[str, Any]]:
    """``(role, content)`` of the user and assistant messages a rendering shows: system
    messages left out, assistant messages before the first user message dropped (they answer
    nothing; DEITA's embedder drops them too).

    Raises:
        ValueError: a role other than system/user/assistant.
    """
    out: list[tuple[str, Any]] = []
    seen_user = False
    for msg in messages:
        role = _role(msg)
        if role == "system":
            continue
        if role not in VICUNA_ROLES:
            raise ValueError(f"{rendering} cannot render role {role!r}")
        if role == "assistant" and not seen_user:
            continue
        seen_user = seen_user or role == "user"
        out.append((role, msg["content"]))
    return out


def vicuna_segments(messages: Sequence[Mapping]) -> list[tuple[str, bool]]:
    """The vicuna_v1.1 rendering as pieces ``(text, is_assistant_target)``.

    The concatenation of the texts equals :func:`render_vicuna`. Assistant targets are the
    assistant contents plus their ``"</s>"`` (the tokens an SFT loss is computed on); the
    ``"ASSISTANT: "`` prefix, user messages and the system text are not targets.

    Matches FastChat's ``vicuna_v1.1`` (``get_conv_template("vicuna_v1.1").get_prompt()``) and
    DEITA's embedder (docs/embedding.md, tested against FastChat's own strings):

    - an empty message renders as ``ROLE + ":"`` with no separator, as FastChat writes it;
    - assistant messages before the first user message are dropped: they answer nothing, and
      DEITA's embedder drops a leading assistant message;
    - a row's system message replaces the default system text (FastChat's
      ``set_system_message``; DEITA's embedder has no system slot and fails on such rows).

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.

    Raises:
        ValueError: a role other than system/user/assistant.
    """
    systems = [m["content"] for m in messages if _role(m) == "system"]
    system = "\n".join(systems) if systems else VICUNA_SYSTEM
    segments: list[tuple[str, bool]] = [(system + VICUNA_SEP, False)]
    for role, content in _turn_messages(messages, "vicuna_v1.1"):
        name = VICUNA_ROLES[role]
        if role == "user":
            segments.append((f"{name}: {content}{VICUNA_SEP}" if content else f"{name}:", False))
        elif content:
            segments.append((f"{name}: ", False))
            segments.append((f"{content}{VICUNA_SEP2}", True))
        else:
            segments.append((f"{name}:", False))
    return segments


def deita_dpo_segments(messages: Sequence[Mapping]) -> list[tuple[str, bool]]:
    """The rendering of DEITA's DPO script (hkust-nlp/deita, src/deita/alignment/dpo_train.py,
    ``preprocess``) as pieces ``(text, is_target)``.

    The script writes the prompt as ``system + " " + "user: " + prompt + " "`` and each
    response as ``"assistant: " + response + "</s>"``: the vicuna_v1.1 rendering with
    lower-case role names, where the whole response text, role tag included, carries the loss
    (TRL's DPOTrainer labels every response token). Multi-turn prompts continue the same
    layout; everything else (system text, roles allowed) is as in :func:`vicuna_segments`.

    Raises:
        ValueError: a role other than system/user/assistant.
    """
    vicuna = vicuna_segments(messages)
    out: list[tuple[str, bool]] = vicuna[:1]  # the system text
    lower = {f"{tag}:": f"{role}:" for role, tag in VICUNA_ROLES.items()}
    for text, target in vicuna[1:]:
        for tag, low in lower.items():
            if not target and text.startswith(tag):
                text = low + text[len(tag) :]
        if target and out and out[-1][0] == f"{lower['ASSISTANT:']} ":
            out[-1] = (out[-1][0] + text, True)  # the role tag joins the response
        else:
            out.append((text, target))
    return out


def render_vicuna(messages: Sequence[Mapping]) -> str:
    """Render a conversation with the vicuna_v1.1 template (docs/embedding.md).

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; system
            messages replace the default system text.

    Returns:
        ``SYSTEM + " " + "USER: u1 ASSISTANT: a1</s>USER: u2 ..."``.
    """
    return "".join(text for text, _ in vicuna_segments(messages))


PLAIN_SEP = "\n\n"


def render_plain(messages: Sequence[Mapping]) -> str:
    """The text a sentence embedder reads: the user and assistant contents in order, joined by
    a blank line (docs/embedding.md).

    No role names and no template: sentence embedders were trained on plain sentences and
    paragraphs. System messages are left out (a system prompt shared by many rows would pull
    unrelated rows together and spend the model's short input window); assistant messages
    before the first user message are dropped, as in :func:`vicuna_segments`; empty messages
    add nothing.

    Raises:
        ValueError: a role other than system/user/assistant.
    """
    return PLAIN_SEP.join(content for _, content in _turn_messages(messages, "plain") if content)


def _chat_template(user: str, assistant: str) -> str:
    """A Jinja chat template that renders exactly as :func:`vicuna_segments` (role names
    ``user`` / ``assistant`` as given), with ``add_generation_prompt`` adding ``assistant + ":"``
    (FastChat's prompt for the next reply)."""
    system = VICUNA_SYSTEM.replace("'", "\\'")
    return (
        "{%- set ns = namespace(system='', has_system=false, seen_user=false) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}"
        "{%- set ns.system = (ns.system + '\\n' + m['content']) if ns.has_system "
        "else m['content'] -%}{%- set ns.has_system = true -%}"
        "{%- endfor -%}"
        f"{{{{- (ns.system if ns.has_system else '{system}') + ' ' -}}}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{%- set ns.seen_user = true -%}"
        f"{{{{- ('{user}: ' + m['content'] + ' ') if m['content'] else '{user}:' -}}}}"
        "{%- elif m['role'] == 'assistant' -%}{%- if ns.seen_user -%}"
        f"{{{{- ('{assistant}: ' + m['content'] + '</s>') if m['content'] else '{assistant}:' -}}}}"
        "{%- endif -%}"
        "{%- elif m['role'] != 'system' -%}"
        "{{- raise_exception('cannot render role ' + m['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{assistant}:' -}}}}{{%- endif -%}}"
    )


VICUNA_CHAT_TEMPLATE = _chat_template("USER", "ASSISTANT")
"""vicuna_v1.1 as a Jinja chat template: ``apply_chat_template`` gives :func:`render_vicuna`'s
text. SFT with ``template: vicuna_v1.1`` saves it as the trained model's chat template."""

DEITA_DPO_CHAT_TEMPLATE = _chat_template("user", "assistant")
"""DEITA's DPO rendering (:func:`deita_dpo_segments`) as a Jinja chat template."""

CHAT_TEMPLATES = {"vicuna_v1.1": VICUNA_CHAT_TEMPLATE, "deita_dpo": DEITA_DPO_CHAT_TEMPLATE}
"""The chat template a model trained with each rendering ships (``chat_template``: its own)."""

"""What a scorer kind is, and the requests it hands to the engine.

A :class:`ScorerKind` (one per registered kind) declares its outputs (columns per turn and per
row), which config fields it uses and its template fields; :meth:`ScorerKind.build_spec` checks a
``score.scorers[i]`` entry at config load and returns a plain :class:`ScorerSpec` that travels to
the workers. On a worker, :meth:`ScorerKind.bind` gives a :class:`BoundScorer`, which turns a
batch into engine requests (:meth:`BoundScorer.prepare`) and the answered requests into
columns (:meth:`BoundScorer.finish`). The score stage (``deita_ray/stages/score.py``) runs every
bound scorer of one model against that model's engine, with one engine call per request type
for the whole batch, so scorers that share a model share its engine and its batches.

Request types (both answered by :class:`~deita_ray.models.backend.Backend`):

- :class:`LabelRequest`: a prompt (template pieces + text fields, truncated inside the fields
  when too long) whose next-token distribution over N label tokens gives the expected label
  value (the DEITA score formula, :func:`deita_ray.scoring.expected_score`);
- :class:`LogprobRequest`: a token sequence whose per-token log-probabilities from ``start`` on
  are wanted (:meth:`~deita_ray.models.backend.Backend.token_logprobs`).
"""

from __future__ import annotations

import dataclasses
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from deita_ray.config import ModelConfig, ScorerConfig
    from deita_ray.scoring import PromptSpec

TURN, ROW, FLAG = "turn", "row", "flag"
"""Output levels: a list with one value per turn, one value per row, a per-row bool flag."""

OPTION_FIELDS: tuple[str, ...] = ("scale", "rating_tokens", "token_ids", "max_ifd")
"""Fields of a scorer entry that only some kinds use (the others must leave them unset)."""


@dataclass(frozen=True)
class Output:
    """One column a kind can write.

    Attributes:
        key: the output's name in ``columns:`` of the scorer entry.
        suffix: column name = ``<name>_<suffix>`` (``<name>`` alone for an empty suffix;
            ``<suffix>`` alone for an empty name).
        level: :data:`TURN` (list, one value per turn), :data:`ROW` or :data:`FLAG`.
        dtype: ``"float64"``, ``"int64"`` or ``"bool"`` (of the values, for turn lists).
        default: written when the entry does not list ``columns``.
        doc: what the value is, including the fold from turns to the row.
    """

    key: str
    suffix: str
    level: str
    dtype: str = "float64"
    default: bool = True
    doc: str = ""

    def column(self, name: str) -> str:
        if not self.suffix:
            return name
        return f"{name}_{self.suffix}" if name else self.suffix


@dataclass(frozen=True)
class ScorerSpec:
    """A checked scorer entry, as plain data for the workers.

    Attributes:
        kind: the registered kind.
        name: column name / prefix.
        key: its config key (``score.scorers[i]``), for messages.
        model: model config (None for kinds that load no model; ``length`` may carry one for
            its tokenizer).
        model_path: the resolved local model folder (set on the driver).
        pieces, fields: the parsed template (fixed text around named text fields).
        columns: output key -> column name, for the outputs it writes.
        options: the kind-specific settings (``scale``, ``rating_tokens``, ...).
        label_ids: token ids of the labels (label kinds; resolved from the tokenizer on the
            driver).
    """

    kind: str
    name: str
    key: str
    model: ModelConfig | None
    columns: dict[str, str]
    model_path: str | None = None
    pieces: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    label_ids: tuple[int, ...] | None = None

    def with_path(self, path: str) -> ScorerSpec:
        return dataclasses.replace(self, model_path=path)

    def with_labels(self, ids: Sequence[int]) -> ScorerSpec:
        return dataclasses.replace(self, label_ids=tuple(int(i) for i in ids))


def parse_template(
    text: str, allowed: Sequence[str], required: Sequence[str], key: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split a template with ``{field}`` placeholders into fixed pieces and field names.

    Literal braces are written ``{{`` and ``}}``. Every placeholder must be a bare name from
    ``allowed``; every name in ``required`` must occur.

    Returns:
        ``(pieces, fields)`` with ``len(pieces) == len(fields) + 1``.

    Raises:
        ConfigError: naming ``key`` and the offending placeholder.
    """
    from deita_ray.config import ConfigError  # noqa: PLC0415

    pieces: list[str] = []
    fields: list[str] = []
    current = ""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ConfigError(
            f"{key}: not a valid template ({e}); write literal braces as {{{{ }}}}"
        ) from None
    for literal, name, spec, conversion in parsed:
        current += literal
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            raise ConfigError(
                f"{key}: placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not allowed (fields: "
                f"{', '.join('{' + a + '}' for a in allowed)}; literal braces: {{{{ }}}})"
            )
        pieces.append(current)
        fields.append(name)
        current = ""
    pieces.append(current)
    missing = [r for r in required if r not in fields]
    if missing:
        raise ConfigError(
            f"{key}: the template lacks the required field "
            f"{', '.join('{' + m + '}' for m in missing)}"
        )
    return tuple(pieces), tuple(fields)


# ------------------------------------------------------------------ engine requests


@dataclass(eq=False)
class LabelRequest:
    """A prompt whose next-token log-probabilities over ``label_ids`` give a score.

    The stage tokenizes ``spec`` (all label requests of a batch in one tokenizer call), fits it
    into the model context (cutting inside the text fields) and fills ``ids``, ``cut`` and then
    ``score`` (the expected label value, 1..N) or ``error``.
    """

    row: int
    turn: int
    spec: PromptSpec
    label_ids: tuple[int, ...]
    ids: list[int] | None = None
    cut: bool = False
    score: float | None = None
    error: str | None = None


@dataclass(eq=False)
class LogprobRequest:
    """A token sequence whose log-probabilities from ``start`` on are wanted; the stage fills
    ``values`` (float64, ``len(seq) - start``) or ``error``."""

    row: int
    turn: int
    seq: list[int]
    start: int
    values: np.ndarray | None = None
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.seq)


@dataclass
class BatchView:
    """What a bound scorer sees of a batch.

    Attributes:
        n: rows in the batch.
        turns: per row, its (instruction, response) turns, or None when the row is not scored
            (rejected earlier, or no turn).
        reject: ``reject(row, reason, detail)`` marks a row as rejected (first reason wins).
        is_live: ``is_live(row)``: not rejected (so far).
    """

    n: int
    turns: list[list[tuple[str, str]] | None]
    reject: Callable[[int, str, str], None]
    is_live: Callable[[int], bool]


Requests = list[LabelRequest | LogprobRequest]
"""What :meth:`BoundScorer.prepare` hands to the engine and :meth:`BoundScorer.finish` gets
back answered."""


class BoundScorer(ABC):
    """One scorer ready to run on a worker (its tokenizer loaded, its budget known).

    A kind's scorer is its arithmetic only: :meth:`prepare` and :meth:`finish`; what every
    scorer needs (its kind, spec, tokenizer and budget, null columns, the columns as Arrow
    arrays) is here.
    """

    def __init__(self, kind: ScorerKind, spec: ScorerSpec, tokenizer: Any, budget: int):
        self.kind = kind
        self.spec = spec
        self.tokenizer = tokenizer
        self.budget = budget

    @abstractmethod
    def prepare(self, view: BatchView) -> Requests:
        """Engine requests of the batch's live rows (may reject rows)."""

    @abstractmethod
    def finish(self, view: BatchView, requests: Requests) -> tuple[dict[str, pa.Array], list[bool]]:
        """The scorer's columns from its answered requests (rows rejected anywhere: null),
        and per row whether this scorer truncated the row's text."""

    def nulls(self, view: BatchView, keys: Sequence[str]) -> dict[str, list]:
        """Per output key, one null per row of the batch (the values :meth:`finish` fills)."""
        return {k: [None] * view.n for k in keys}

    def arrays(self, values: dict[str, list]) -> dict[str, pa.Array]:
        """The Arrow columns of the outputs the spec writes (:func:`output_arrays`)."""
        return output_arrays(self.kind, self.spec, values)


class ScorerKind(ABC):
    """A registered kind of scorer (see the module docstring).

    Class attributes:
        kind: registered name.
        scorer: the :class:`BoundScorer` class that :meth:`bind` makes.
        default_name: column name / prefix when the entry sets none.
        uses_model: loads an engine (runs in a model actor pool); False: a CPU task.
        has_labels: its label token ids come from the model's tokenizer
            (:meth:`resolve_labels`, on the driver, so a bad label fails before any actor).
        outputs: the columns it can write.
        options: the kind-specific entry fields it accepts (see :data:`OPTION_FIELDS`).
        template_fields / required_fields: placeholders its template may / must contain;
            an empty ``template_fields`` means the kind has a fixed prompt or none.
        default_template: the template when the entry sets none.
    """

    kind: str = ""
    scorer: type[BoundScorer]
    default_name: str = ""
    uses_model: bool = True
    has_labels: bool = False
    outputs: tuple[Output, ...] = ()
    options: tuple[str, ...] = ()
    template_fields: tuple[str, ...] = ()
    required_fields: tuple[str, ...] = ()
    default_template: str | None = None

    def build_spec(
        self,
        sc: ScorerConfig,
        model: ModelConfig | None,
        key: str,
        digit_token_ids: Sequence[int] | None = None,
    ) -> ScorerSpec:
        """Check one config entry against this kind; the spec it describes.

        Raises:
            ConfigError: naming the entry's key (``score.scorers[i].<field>``).
        """
        from deita_ray.config import ConfigError  # noqa: PLC0415

        if self.uses_model and model is None:
            raise ConfigError(f"{key}.model: required for kind {self.kind!r}")
        for opt in OPTION_FIELDS:
            if getattr(sc, opt) is not None and opt not in self.options:
                used = ", ".join(self.options) or "none"
                raise ConfigError(
                    f"{key}.{opt}: not used by kind {self.kind!r} (its own settings: {used})"
                )
        pieces: tuple[str, ...] = ()
        fields: tuple[str, ...] = ()
        if sc.template is not None and not self.template_fields:
            raise ConfigError(
                f"{key}.template: kind {self.kind!r} has a fixed prompt or none (a rubric of "
                "your own: kind 'rating')"
            )
        if self.template_fields:
            text = sc.template if sc.template is not None else self.default_template
            assert text is not None
            pieces, fields = parse_template(
                text, self.template_fields, self.required_fields, f"{key}.template"
            )
        name = sc.name if sc.name is not None else self.default_name
        by_key = {o.key: o for o in self.outputs}
        wanted = [o.key for o in self.outputs if o.default] if sc.columns is None else sc.columns
        for k in wanted:
            if k not in by_key:
                raise ConfigError(
                    f"{key}.columns: {k!r} is not an output of kind {self.kind!r} "
                    f"(allowed: {', '.join(by_key)})"
                )
        columns = {k: by_key[k].column(name) for k in wanted}
        if not columns:
            raise ConfigError(f"{key}.columns: a scorer must write at least one column")
        options = {o: getattr(sc, o) for o in self.options}
        spec = ScorerSpec(
            kind=self.kind,
            name=name,
            key=key,
            model=model,
            columns=columns,
            pieces=pieces,
            fields=fields,
            options=options,
        )
        return self.check(spec, digit_token_ids)

    def check(self, spec: ScorerSpec, digit_token_ids: Sequence[int] | None) -> ScorerSpec:
        """Kind-specific checks and defaults (override); returns the spec."""
        return spec

    def resolve_labels(self, spec: ScorerSpec, tokenizer: Any) -> ScorerSpec:
        """Fill what needs the tokenizer (label token ids) on the driver (override)."""
        return spec

    def bind(self, spec: ScorerSpec, tokenizer: Any, budget: int) -> BoundScorer:
        """The scorer ready to run on a worker with ``tokenizer`` and a prompt token budget."""
        return self.scorer(self, spec, tokenizer, budget)


# ------------------------------------------------------------------ column helpers


def arrow_type(level: str, dtype: str) -> pa.DataType:
    """Arrow type of an output: ``list<dtype>`` for turn lists, ``dtype`` otherwise."""
    import pyarrow as pa  # noqa: PLC0415

    base = {"float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}[dtype]
    return pa.list_(base) if level == TURN else base


def output_arrays(
    kind: ScorerKind, spec: ScorerSpec, values: dict[str, list]
) -> dict[str, pa.Array]:
    """Arrow columns of the outputs ``spec`` writes, from plain per-row value lists."""
    import pyarrow as pa  # noqa: PLC0415

    out = {}
    for o in kind.outputs:
        if o.key in spec.columns:
            out[spec.columns[o.key]] = pa.array(values[o.key], arrow_type(o.level, o.dtype))
    return out

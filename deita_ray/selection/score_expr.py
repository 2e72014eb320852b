"""The selection score: a row column, or a small arithmetic expression over row columns.

``select.score`` is parsed with :mod:`ast` and only these nodes are allowed: column names,
numbers, ``+ - * /``, unary ``-`` / ``+`` and parentheses. Nothing is ever evaluated as Python:
the tree is walked here and computed with numpy on float64 arrays, so a config cannot run
code. A null input, a division by zero or any other non-finite result makes the row's score
NaN, i.e. the row is not a candidate (reported as ``missing_score``).

Example:
    >>> import numpy as np
    >>> e = parse("complexity * quality - 0.5")
    >>> e.names
    ('complexity', 'quality')
    >>> e.evaluate({"complexity": np.array([2.0, np.nan]), "quality": np.array([3.0, 1.0])})
    array([5.5, nan])
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_LENGTH = 500
"""Longest expression accepted (a selection score is a short formula)."""

_BINARY = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.divide}
_UNARY = {ast.USub: np.negative, ast.UAdd: np.positive}


class ScoreExpressionError(ValueError):
    """The expression is not a column name or an allowed arithmetic expression."""


@dataclass(frozen=True)
class ScoreExpression:
    """A parsed selection score.

    Attributes:
        text: the expression as written.
        names: the column names it reads, in order of first use.
    """

    text: str
    names: tuple[str, ...]
    tree: ast.expr

    def check_columns(self, names: Sequence[str], folder: str) -> None:
        """Raise ValueError naming the first column the expression reads that ``folder``
        (whose columns are ``names``) does not hold."""
        missing = [c for c in self.names if c not in names]
        if missing:
            raise ValueError(
                f"select.score={self.text!r} reads {missing[0]!r}, which {folder} does not "
                f"hold (columns: {', '.join(names)}); re-run the score stage with a scorer "
                "that writes it"
            )

    @property
    def is_column(self) -> bool:
        """The expression is a bare column name."""
        return isinstance(self.tree, ast.Name)

    def evaluate(self, columns: Mapping[str, Any]) -> np.ndarray:
        """Float64 scores (NaN where a column is null or the result is not finite).

        Args:
            columns: name -> values (numpy arrays or Arrow arrays; nulls become NaN), all of
                one length.
        """
        arrays = {n: _as_float(columns[n]) for n in self.names}
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            # np.array copies: the result never aliases an input column. Every expression
            # reads a column (parse() checks), so the result has one value per row.
            out = np.array(_walk(self.tree, arrays), dtype=np.float64)
        out[~np.isfinite(out)] = np.nan
        return out


def _as_float(values: Any) -> np.ndarray:
    import pyarrow as pa  # noqa: PLC0415

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64)


def _walk(node: ast.expr, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(node, ast.Name):
        return arrays[node.id]
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_walk(node.left, arrays), _walk(node.right, arrays))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_walk(node.operand, arrays))
    raise AssertionError(f"unchecked node {type(node).__name__}")  # parse() rejects it


def _check(node: ast.AST, names: list[str]) -> None:
    if isinstance(node, ast.Name):
        if node.id not in names:
            names.append(node.id)
        return
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ScoreExpressionError(f"only numbers are allowed as constants, not {node.value!r}")
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, names)
        _check(node.right, names)
        return
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, names)
        return
    what = type(getattr(node, "op", node)).__name__
    raise ScoreExpressionError(
        f"{what} is not allowed: use column names, numbers, + - * /, unary minus and parentheses"
    )


def parse(text: str) -> ScoreExpression:
    """Parse and check a selection score expression.

    Raises:
        ScoreExpressionError: a syntax error or any construct besides names, numbers,
            ``+ - * /``, unary minus/plus and parentheses (calls, attributes, subscripts,
            comparisons, ``**``, ...).
    """
    if not isinstance(text, str) or not text.strip():
        raise ScoreExpressionError("empty expression; name a score column, e.g. evol_score")
    if len(text) > MAX_LENGTH:
        raise ScoreExpressionError(f"longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ScoreExpressionError(f"{text!r} is not an expression ({e.msg})") from None
    names: list[str] = []
    _check(tree, names)
    if not names:
        raise ScoreExpressionError(f"{text!r} reads no column")
    return ScoreExpression(text=text, names=tuple(names), tree=tree)

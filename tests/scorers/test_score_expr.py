"""The selection score expression: names, numbers, + - * /, unary minus, parentheses; nothing
else is accepted and nothing is evaluated as Python."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from deita_ray.selection.score_expr import ScoreExpressionError, parse


def test_column_and_arithmetic():
    cols = {
        "complexity": np.array([2.0, 3.0, np.nan, 4.0]),
        "quality": pa.array([3.0, None, 1.0, 0.0]),  # Arrow nulls become NaN
    }
    assert parse("complexity").is_column and parse("complexity").names == ("complexity",)
    e = parse("complexity * quality")
    assert not e.is_column and e.names == ("complexity", "quality")
    np.testing.assert_array_equal(e.evaluate(cols), [6.0, np.nan, np.nan, 0.0])
    np.testing.assert_array_equal(parse("-complexity").evaluate(cols), [-2.0, -3.0, np.nan, -4.0])
    got = parse("(complexity + 1) / 2 - -quality * 0.5").evaluate(cols)
    np.testing.assert_allclose(got, [3.0, np.nan, np.nan, 2.5])
    # a division by zero is not a score: NaN, i.e. not a candidate
    np.testing.assert_array_equal(
        parse("complexity / quality").evaluate(cols), [2.0 / 3.0, np.nan, np.nan, np.nan]
    )


def test_result_never_aliases_a_column():
    col = np.array([1.0, np.inf])
    out = parse("x").evaluate({"x": col})
    assert np.isnan(out[1]) and col[1] == np.inf


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "evol_score.real",
        "evol_score[0]",
        "evol_score ** 2",
        "evol_score if ifd else 1",
        "evol_score > 1",
        "lambda: 1",
        "abs(ifd)",
        "'text'",
        "True + ifd",
        "ifd; ifd",
        "",
        "1 + 2",
        "ifd % 2",
        "not ifd",
    ],
)
def test_anything_else_is_rejected(text):
    with pytest.raises(ScoreExpressionError):
        parse(text)

"""report.html: the data behind each figure, on a model whose routers leave experts dead."""

import math

import torch

from biased_models import MIN_TOKENS, biased, calib_ids, recipe
from moequant import quantize
from moequant.html_report import figure_data, render


def test_figures_show_dead_experts_and_errors():
    model = biased("qwen3_moe")
    result = quantize(model, recipe("nvfp4-mse"), calib_ids())
    data = figure_data(result.state, result.report)
    tokens = data["tokens"]
    coverage = result.report.coverage
    assert tokens.rows == [c.path for c in coverage]
    assert tokens.values == [[float(n) for n in c.tokens] for c in coverage]
    dead = {(i, e) for i, c in enumerate(coverage) for e, n in enumerate(c.tokens) if n == 0}
    rare = {(i, e) for i, c in enumerate(coverage) for e, n in enumerate(c.tokens) if n < MIN_TOKENS}
    assert dead, "the biased routers must leave some experts without tokens"
    assert set(tokens.marks) == rare and dead <= set(tokens.marks)
    for heat in data["errors"]:
        assert len(heat.rows) == len(coverage)
        for row in heat.values:
            assert len(row) == 8 and all(math.isfinite(v) and 0 < v < 1 for v in row)
    # dead experts have errors like the others: scales came from their own weights
    down = next(h for h in data["errors"] if "down_proj" in h.title)
    for i, e in dead:
        others = [v for j, v in enumerate(down.values[i]) if j != e]
        assert min(others) / 2 < down.values[i][e] < 2 * max(others)
    assert all(gain > 0 for _, gain in data["mse_gain"])
    page = render(result.state, result.report, ["summary"], "title")
    assert page.count("<svg") == 1 + len(data["errors"]) + 1

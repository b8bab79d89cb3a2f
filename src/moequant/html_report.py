"""A self-contained ``report.html``: the pictures a person wants after a quantize run.

Figures (inline SVG, no external assets, no plotting dependency):
  * layer x expert heatmap of routed calibration tokens (dead / under-covered experts stand out);
  * layer x expert heatmap of relative weight error of the shipped scales (gate_up and down);
  * per-layer bars of the weight-error reduction of the MSE search over max block scales.
The numbers behind each figure come from ``figure_data`` so tests check data, not pixels.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from moequant.scales import QuantState


@dataclass
class Heatmap:
    title: str
    rows: list[str]                 # layer labels
    values: list[list[float]]       # [layer][expert]
    unit: str
    marks: list[tuple[int, int]]    # (row, col) cells to outline (under-covered experts)


def routed_tokens_heatmap(coverage) -> Heatmap | None:
    if not coverage:
        return None
    rows = [c.path for c in coverage]
    values = [[float(n) for n in c.tokens] for c in coverage]
    marks = [(i, e) for i, c in enumerate(coverage) for e, _, _ in c.under_covered]
    return Heatmap("Routed calibration tokens per expert (outlined: under-covered)", rows, values, "tokens", marks)


def expert_error_heatmaps(state: QuantState) -> list[Heatmap]:
    maps = {}
    for t in state.plan.expert_targets():
        s = state.tensors[t.key]
        rel = (s.sq_error / s.sq_norm.clamp_min(1e-30)).sqrt().tolist()
        maps.setdefault(t.param_name, ([], []))
        maps[t.param_name][0].append(t.module_path)
        maps[t.param_name][1].append(rel)
    return [Heatmap(f"Relative weight error per expert: {param} (shipped scales)", rows, vals, "rel. error", [])
            for param, (rows, vals) in maps.items()]


def mse_gain_by_layer(state: QuantState) -> list[tuple[str, float]]:
    """(layer label, % reduction of summed squared weight error, shipped vs max block scales)."""
    acc: dict[str, list[float]] = {}
    for t in state.plan.targets:
        s = state.tensors[t.key]
        label = f"layer {t.layer}" if t.layer is not None else "other"
        a = acc.setdefault(label, [0.0, 0.0])
        a[0] += float(s.sq_error.sum())
        a[1] += float(s.sq_error_max.sum())
    return [(k, 100.0 * (1 - v[0] / v[1]) if v[1] > 0 else 0.0) for k, v in acc.items()]


def figure_data(state: QuantState, report) -> dict:
    tokens = routed_tokens_heatmap(getattr(report, "coverage", []))
    return {"tokens": tokens, "errors": expert_error_heatmaps(state), "mse_gain": mse_gain_by_layer(state)}


def _color(v: float, lo: float, hi: float) -> str:
    x = 0.0 if hi <= lo else (v - lo) / (hi - lo)
    x = min(max(x, 0.0), 1.0)
    r, g, b = int(255 * (1 - 0.8 * x)), int(255 * (1 - 0.55 * x)), int(255 * (1 - 0.1 * x))
    return f"rgb({r},{g},{b})"


def _heatmap_svg(h: Heatmap, log_scale: bool = False) -> str:
    cell, left, top = 22, 230, 30
    n_cols = max(len(r) for r in h.values)
    f = (lambda v: math.log10(1 + v)) if log_scale else (lambda v: v)
    flat = [f(v) for r in h.values for v in r]
    lo, hi = min(flat), max(flat)
    raw = [v for r in h.values for v in r]
    width, height = max(left + cell * n_cols + 20, 520), top + cell * len(h.values) + 34
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">']
    for e in range(n_cols):
        parts.append(f'<text x="{left + e * cell + cell / 2}" y="{top - 8}" text-anchor="middle">{e}</text>')
    marks = set(h.marks)
    for i, (label, row) in enumerate(zip(h.rows, h.values)):
        y = top + i * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell * 0.7}" text-anchor="end">{html.escape(label)}</text>')
        for e, v in enumerate(row):
            stroke = ' stroke="#d62728" stroke-width="2.5"' if (i, e) in marks else ' stroke="#fff"'
            parts.append(f'<rect x="{left + e * cell}" y="{y}" width="{cell}" height="{cell}" '
                         f'fill="{_color(f(v), lo, hi)}"{stroke}><title>{html.escape(label)} expert {e}: '
                         f'{v:.4g} {h.unit}</title></rect>')
    legend_y = top + cell * len(h.values) + 20
    scale = "log scale, " if log_scale else ""
    parts.append(f'<rect x="{left}" y="{legend_y - 10}" width="12" height="12" fill="{_color(lo, lo, hi)}" '
                 f'stroke="#999"/><text x="{left + 16}" y="{legend_y}">{min(raw):.4g}</text>'
                 f'<rect x="{left + 90}" y="{legend_y - 10}" width="12" height="12" fill="{_color(hi, lo, hi)}"/>'
                 f'<text x="{left + 106}" y="{legend_y}">{max(raw):.4g} {html.escape(h.unit)} ({scale}'
                 f'hover a cell for its value)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bars_svg(items: list[tuple[str, float]]) -> str:
    w, left, bar = 520, 90, 16
    top = max((v for _, v in items), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + left + 60}" height="{len(items) * (bar + 4) + 10}" '
             'font-size="11">']
    for i, (label, v) in enumerate(items):
        y = 4 + i * (bar + 4)
        length = max(0.0, v) / top * w
        parts.append(f'<text x="{left - 6}" y="{y + bar * 0.8}" text-anchor="end">{html.escape(label)}</text>'
                     f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" fill="#2c7fb8"/>'
                     f'<text x="{left + length + 4}" y="{y + bar * 0.8}">{v:.1f}%</text>')
    parts.append("</svg>")
    return "".join(parts)


def render(state: QuantState, report, summary_lines: list[str], title: str) -> str:
    data = figure_data(state, report)
    body = [f"<h1>{html.escape(title)}</h1>", "<pre>" + html.escape("\n".join(summary_lines)) + "</pre>"]
    if data["tokens"] is not None:
        body += [f"<h2>{html.escape(data['tokens'].title)}</h2>", _heatmap_svg(data["tokens"], log_scale=True)]
    for h in data["errors"]:
        body += [f"<h2>{html.escape(h.title)}</h2>", _heatmap_svg(h)]
    body += ["<h2>Weight-error reduction of the MSE search over max block scales, per layer</h2>",
             _bars_svg(data["mse_gain"])]
    style = "body{font-family:sans-serif;margin:24px;max-width:1200px}pre{background:#f6f6f6;padding:10px}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")

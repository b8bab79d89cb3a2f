"""What a ``quantize`` run found and did, as plain data with a text rendering.

The report is the place where every remedy is listed: which experts were under-covered and what scale each
got, which groups share scales, how much the MSE search lowered the weight error, what each stage cost in
time and memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moequant.calibrate import ExpertsCoverage
from moequant.scales import QuantState


@dataclass(frozen=True)
class WeightError:
    """Relative squared weight error of one target: sum (w - deq)^2 / sum w^2, over all its experts."""

    key: str
    method: str
    relative_error: float        # with the shipped block scales
    relative_error_max: float    # with "max" block scales (the baseline MSE search improves on)
    gptq_fallback: tuple[tuple[int | None, int], ...] = ()   # "gptq": (expert or None, formats.gptq reason)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes. ``device_peak`` is measured (CUDA allocator peak) when calibrating on a CUDA device, else None;
    ``process_peak_rss`` is the process's lifetime peak resident size (``getrusage``), for reference."""

    device: str
    device_peak: int | None
    model_bytes: int             # all parameters and buffers of the model
    largest_layer_bytes: int     # the most any one decoder layer holds (what sequential mode moves)
    activation_bytes: int        # captured layer inputs of all calibration samples (incl. their kwargs)
    process_peak_rss: int


@dataclass
class Report:
    recipe: str
    sequential: bool
    calibration: str                                   # data source; "" when no forward was needed
    tokens: int                                        # calibration tokens per layer
    policy: str
    min_tokens: int
    coverage: list[ExpertsCoverage] = field(default_factory=list)
    groups: list[tuple[str, ...]] = field(default_factory=list)
    weight_errors: list[WeightError] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    memory: MemoryReport | None = None
    notes: list[str] = field(default_factory=list)

    def under_covered(self) -> dict[str, list[int]]:
        """Container path -> under-covered experts."""
        return {c.path: [e for e, _, _ in c.under_covered] for c in self.coverage if c.under_covered}

    def observation_cost(self) -> tuple[int, int]:
        """(expert x token evaluations in the observed forward, in targeted coverage passes), all layers."""
        return sum(c.main_evals for c in self.coverage), sum(c.extra_evals for c in self.coverage)

    def gptq_fallback(self) -> dict[str, list[tuple[int | None, str]]]:
        """Target key -> (expert or None, why) of every expert / linear whose codes are round to nearest under
        "gptq" (its scales are the weighted search's either way)."""
        from moequant.formats.gptq import FALLBACK_REASONS

        return {w.key: [(e, FALLBACK_REASONS[r]) for e, r in w.gptq_fallback] for w in self.weight_errors
                if w.gptq_fallback}

    def floor_summary(self) -> str | None:
        """One line on the experts' input-scale layer floor (``calibrate.layer_floor``): how many expert inputs it
        raised, and the largest factor; None when no MoE layer was calibrated with it."""
        layers = [c for c in self.coverage if c.floor != "none"]
        if not layers:
            return None
        raised = [(c.path, *f) for c in layers for f in c.floored]
        line = (f"{len(raised)} expert inputs raised to the layer's amax in {len(layers)} MoE layers "
                f"(gate_up {sum(r[1] == 'gate_up' for r in raised)}, down {sum(r[1] == 'down' for r in raised)})")
        ratio = [(to / own if own > 0 else float("inf"), path, name, e) for path, name, e, own, to in raised]
        if ratio:
            factor, path, name, e = max(ratio)
            line += f"; largest factor {factor:.3g}x ({path} expert {e} {name})"
        return line

    def weight_error_totals(self) -> tuple[float, float]:
        """Mean relative error over targets: (shipped scales, max scales)."""
        if not self.weight_errors:
            return 0.0, 0.0
        n = len(self.weight_errors)
        return (sum(w.relative_error for w in self.weight_errors) / n,
                sum(w.relative_error_max for w in self.weight_errors) / n)

    def to_text(self) -> str:
        lines = [f"recipe {self.recipe}; {'layer by layer' if self.sequential else 'all at once'}; "
                 f"calibration: {self.calibration or 'none needed'}"]
        for c in self.coverage:
            lines.append(f"  {c.path}: {len(c.tokens)} experts, {len(c.under_covered)} under-covered "
                         f"(< {c.min_tokens} of {c.total_tokens} tokens)")
            lines.extend(f"    expert {e}: {n} routed tokens -> {got}" for e, n, got in c.under_covered)
            raised = [f"{name} e{e} {to / own if own > 0 else float('inf'):.3g}x" for name, e, own, to in c.floored]
            if raised:
                lines.append(f"    input floor ({c.floor}) raised: " + ", ".join(raised))
        main, extra = self.observation_cost()
        lines.append(f"  observation cost ({self.policy}): {main} + {extra} expert x token evaluations")
        lines.append(f"  groups sharing scales: {len(self.groups)}")
        shipped, baseline = self.weight_error_totals()
        lines.append(f"  weight error (mean relative): {shipped:.6g} shipped vs {baseline:.6g} with max scales")
        for key, fallback in self.gptq_fallback().items():
            reasons: dict[str, list] = {}
            for e, why in fallback:
                reasons.setdefault(why, []).append(e)
            lines.extend(f"  gptq fallback to round-to-nearest, {key}: " + ("" if None in ex else f"experts {ex}: ")
                         + why for why, ex in reasons.items())
        lines.append("  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.stage_seconds.items()))
        if self.memory is not None:
            m = self.memory
            peak = "n/a" if m.device_peak is None else f"{m.device_peak / 2**20:.1f} MiB"
            lines.append(f"  memory: device {m.device} peak {peak}; model {m.model_bytes / 2**20:.1f} MiB, "
                         f"largest layer {m.largest_layer_bytes / 2**20:.1f} MiB, activations "
                         f"{m.activation_bytes / 2**20:.1f} MiB")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def weight_errors(state: QuantState) -> list[WeightError]:
    out = []
    for key, s in state.tensors.items():
        norm = float(s.sq_norm.sum())
        denom = norm if norm > 0 else 1.0
        out.append(WeightError(key, s.method, float(s.sq_error.sum()) / denom, float(s.sq_error_max.sum()) / denom,
                               _fallback(s.gptq_status)))
    return out


def _fallback(status: torch.Tensor | None) -> tuple[tuple[int | None, int], ...]:
    """(expert or None for a linear, reason) where ``status`` (``TensorScales.gptq_status``) is not GPTQ (0)."""
    if status is None:
        return ()
    if status.ndim == 0:
        return ((None, int(status)),) if int(status) else ()
    return tuple((e, int(r)) for e, r in enumerate(status.tolist()) if r)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

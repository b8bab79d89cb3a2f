"""Does the shipped input scale hold on held-out text? Per quantized linear and per expert projection.

A static input scale fixes the largest activation the engine can represent: NVFP4 (W4A4) per-block FP8 scales
saturate at 448, so a block whose amax exceeds ``input_scale * 6 * 448`` is clipped (``formats.activations``);
FP8 activations clip at ``input_scale * 448``. ``moequant eval`` records, on the quantized model it evaluates,
the amax of every quantized input just before it is fake-quantized (per expert: over the tokens routed to that
expert there) and reports

    ratio = held-out amax / representable amax

worst first: a ratio above 1 means held-out activations were clipped (by that factor), which the calibration
text never showed. An expert that no held-out token reached has no ratio (listed as unobserved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moequant.formats.fp4 import E2M1_MAX
from moequant.formats.fp8 import E4M3_MAX

SHOWN = 10


def representable_amax(input_scale: float, scheme: str) -> float:
    """Largest magnitude the shipped static ``input_scale`` lets the engine represent."""
    if scheme == "nvfp4":
        return input_scale * E2M1_MAX * E4M3_MAX
    if scheme == "fp8":
        return input_scale * E4M3_MAX
    raise ValueError(f"unknown activation scheme {scheme!r}")


@dataclass
class InputRange:
    """One quantized input: a linear, or one expert's gate_up or down projection."""

    name: str                # the checkpoint's module name(s), e.g. "model.layers.11.mlp.experts.5.down_proj"
    scheme: str              # "nvfp4" | "fp8"
    input_scale: float       # as shipped (ModelOpt convention: amax / 2688, or / 448)
    tokens: int = 0          # rows (tokens) that reached it on the held-out text
    amax: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))

    def observe(self, x: torch.Tensor) -> None:
        """Running max of |x| (kept on x's device: no wait for it per call)."""
        if x.numel() == 0:
            return
        low, high = torch.aminmax(x.detach())
        self.amax = torch.maximum(self.amax.to(x.device), torch.maximum(-low, high).float())
        self.tokens += x.numel() // x.shape[-1]

    @property
    def representable(self) -> float:
        return representable_amax(self.input_scale, self.scheme)

    @property
    def ratio(self) -> float:
        """held-out amax / representable amax; NaN when no token reached it."""
        return float(self.amax) / self.representable if self.tokens else math.nan


def worst_first(ranges: list[InputRange]) -> list[InputRange]:
    """Observed inputs by descending ratio (ties by name), then the unobserved ones by name."""
    seen = sorted((r for r in ranges if r.tokens), key=lambda r: (-r.ratio, r.name))
    return seen + sorted((r for r in ranges if not r.tokens), key=lambda r: r.name)


def summary_lines(ranges: list[InputRange], shown: int = SHOWN) -> list[str]:
    """The input-range table of ``moequant eval`` (``ranges`` worst first)."""
    seen = [r for r in ranges if r.tokens]
    if not seen:
        return []
    clipped = sum(r.ratio > 1 for r in seen)
    lines = [f"input ranges, held-out amax / representable amax of the shipped input scale (> 1: clipped), "
             f"{len(seen)} quantized inputs observed, {clipped} clipped, "
             f"{len(ranges) - len(seen)} not reached by a held-out token:"]
    lines += [f"  {r.ratio:10.3g}x  {r.name}  ({r.tokens} tokens, amax {float(r.amax):.4g}, representable "
              f"{r.representable:.4g})" for r in seen[:shown]]
    lowest = min(seen, key=lambda r: r.ratio)
    lines.append(f"  lowest ratio {lowest.ratio:.3g} ({lowest.name}): the scale has that much unused range")
    return lines


def module_name(names: list[str]) -> str:
    """One display name for an input shared by several checkpoint modules (an expert's gate and up):
    ``prefix.{a,b}``."""
    if len(names) == 1:
        return names[0]
    prefix = names[0].rsplit(".", 1)[0]
    if all(n.rsplit(".", 1)[0] == prefix for n in names):
        return f"{prefix}.{{{','.join(n.rsplit('.', 1)[1] for n in names)}}}"
    return ",".join(names)
